//! Raw declarations of the parts of Triton's C API (`tritonserver.h`, `tritonbackend.h`,
//! backend API 1.19, server 2.51) that this backend uses.
//!
//! Nothing here is linked at build time: the functions stay undefined in
//! `libtriton_active_learning.so` and are resolved at load time against the server's own
//! `libtritonserver.so`. C enums are `u32` type aliases with one constant per enumerator (the
//! enumerators are all non-negative, so the C compiler gives them a 32-bit unsigned type); the
//! constants keep the C names so they can be searched for in the headers.
//!
//! Unless noted otherwise a returned `*mut TRITONSERVER_Error` is null on success and is owned by
//! the caller otherwise (delete it with [`TRITONSERVER_ErrorDelete`]), and returned strings and
//! buffers are owned by the object they came from and live as long as that object.

#![allow(non_camel_case_types)]
// A faithful declaration of the enumerations: not every constant is used.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_void};
use std::marker::{PhantomData, PhantomPinned};

/// Declares opaque C structs: never built, read or moved on the Rust side, only pointed to.
macro_rules! opaque_types {
    ($($name:ident),* $(,)?) => {
        $(
            #[repr(C)]
            pub struct $name {
                _data: [u8; 0],
                _marker: PhantomData<(*mut u8, PhantomPinned)>,
            }
        )*
    };
}

opaque_types!(
    TRITONSERVER_Error,
    TRITONSERVER_Message,
    TRITONSERVER_Parameter,
    TRITONSERVER_Server,
    TRITONSERVER_BufferAttributes,
    TRITONSERVER_MetricFamily,
    TRITONSERVER_Metric,
    TRITONBACKEND_Backend,
    TRITONBACKEND_Model,
    TRITONBACKEND_ModelInstance,
    TRITONBACKEND_Request,
    TRITONBACKEND_Input,
    TRITONBACKEND_Output,
    TRITONBACKEND_Response,
);

// ---- Enumerations --------------------------------------------------------------------------

/// `TRITONSERVER_Error_Code`.
pub type TRITONSERVER_Error_Code = u32;
pub const TRITONSERVER_ERROR_UNKNOWN: TRITONSERVER_Error_Code = 0;
pub const TRITONSERVER_ERROR_INTERNAL: TRITONSERVER_Error_Code = 1;
pub const TRITONSERVER_ERROR_NOT_FOUND: TRITONSERVER_Error_Code = 2;
pub const TRITONSERVER_ERROR_INVALID_ARG: TRITONSERVER_Error_Code = 3;
pub const TRITONSERVER_ERROR_UNAVAILABLE: TRITONSERVER_Error_Code = 4;
pub const TRITONSERVER_ERROR_UNSUPPORTED: TRITONSERVER_Error_Code = 5;
pub const TRITONSERVER_ERROR_ALREADY_EXISTS: TRITONSERVER_Error_Code = 6;
pub const TRITONSERVER_ERROR_CANCELLED: TRITONSERVER_Error_Code = 7;

/// `TRITONSERVER_DataType`.
pub type TRITONSERVER_DataType = u32;
pub const TRITONSERVER_TYPE_INVALID: TRITONSERVER_DataType = 0;
pub const TRITONSERVER_TYPE_BOOL: TRITONSERVER_DataType = 1;
pub const TRITONSERVER_TYPE_UINT8: TRITONSERVER_DataType = 2;
pub const TRITONSERVER_TYPE_UINT16: TRITONSERVER_DataType = 3;
pub const TRITONSERVER_TYPE_UINT32: TRITONSERVER_DataType = 4;
pub const TRITONSERVER_TYPE_UINT64: TRITONSERVER_DataType = 5;
pub const TRITONSERVER_TYPE_INT8: TRITONSERVER_DataType = 6;
pub const TRITONSERVER_TYPE_INT16: TRITONSERVER_DataType = 7;
pub const TRITONSERVER_TYPE_INT32: TRITONSERVER_DataType = 8;
pub const TRITONSERVER_TYPE_INT64: TRITONSERVER_DataType = 9;
pub const TRITONSERVER_TYPE_FP16: TRITONSERVER_DataType = 10;
pub const TRITONSERVER_TYPE_FP32: TRITONSERVER_DataType = 11;
pub const TRITONSERVER_TYPE_FP64: TRITONSERVER_DataType = 12;
pub const TRITONSERVER_TYPE_BYTES: TRITONSERVER_DataType = 13;
pub const TRITONSERVER_TYPE_BF16: TRITONSERVER_DataType = 14;

/// `TRITONSERVER_MemoryType`.
pub type TRITONSERVER_MemoryType = u32;
pub const TRITONSERVER_MEMORY_CPU: TRITONSERVER_MemoryType = 0;
pub const TRITONSERVER_MEMORY_CPU_PINNED: TRITONSERVER_MemoryType = 1;
pub const TRITONSERVER_MEMORY_GPU: TRITONSERVER_MemoryType = 2;

/// `TRITONSERVER_ParameterType`.
pub type TRITONSERVER_ParameterType = u32;
pub const TRITONSERVER_PARAMETER_STRING: TRITONSERVER_ParameterType = 0;
pub const TRITONSERVER_PARAMETER_INT: TRITONSERVER_ParameterType = 1;
pub const TRITONSERVER_PARAMETER_BOOL: TRITONSERVER_ParameterType = 2;
pub const TRITONSERVER_PARAMETER_DOUBLE: TRITONSERVER_ParameterType = 3;
pub const TRITONSERVER_PARAMETER_BYTES: TRITONSERVER_ParameterType = 4;

/// `TRITONSERVER_InstanceGroupKind`.
pub type TRITONSERVER_InstanceGroupKind = u32;
pub const TRITONSERVER_INSTANCEGROUPKIND_AUTO: TRITONSERVER_InstanceGroupKind = 0;
pub const TRITONSERVER_INSTANCEGROUPKIND_CPU: TRITONSERVER_InstanceGroupKind = 1;
pub const TRITONSERVER_INSTANCEGROUPKIND_GPU: TRITONSERVER_InstanceGroupKind = 2;
pub const TRITONSERVER_INSTANCEGROUPKIND_MODEL: TRITONSERVER_InstanceGroupKind = 3;

/// `TRITONSERVER_LogLevel`.
pub type TRITONSERVER_LogLevel = u32;
pub const TRITONSERVER_LOG_INFO: TRITONSERVER_LogLevel = 0;
pub const TRITONSERVER_LOG_WARN: TRITONSERVER_LogLevel = 1;
pub const TRITONSERVER_LOG_ERROR: TRITONSERVER_LogLevel = 2;
pub const TRITONSERVER_LOG_VERBOSE: TRITONSERVER_LogLevel = 3;

/// `TRITONSERVER_MetricKind`.
pub type TRITONSERVER_MetricKind = u32;
pub const TRITONSERVER_METRIC_KIND_COUNTER: TRITONSERVER_MetricKind = 0;
pub const TRITONSERVER_METRIC_KIND_GAUGE: TRITONSERVER_MetricKind = 1;
/// Needs `TRITONSERVER_MetricNewWithArgs` (not declared here): `MetricNew` rejects it.
pub const TRITONSERVER_METRIC_KIND_HISTOGRAM: TRITONSERVER_MetricKind = 2;

/// `TRITONSERVER_RequestReleaseFlag` (passed as a `uint32_t` bit set).
pub type TRITONSERVER_RequestReleaseFlag = u32;
/// `TRITONSERVER_ModelIndexFlag`: only the models loaded and ready.
pub const TRITONSERVER_INDEX_FLAG_READY: u32 = 1;
pub const TRITONSERVER_REQUEST_RELEASE_ALL: TRITONSERVER_RequestReleaseFlag = 1;
pub const TRITONSERVER_REQUEST_RELEASE_RESCHEDULE: TRITONSERVER_RequestReleaseFlag = 2;

/// `TRITONSERVER_ResponseCompleteFlag` (passed as a `uint32_t` bit set).
pub type TRITONSERVER_ResponseCompleteFlag = u32;
pub const TRITONSERVER_RESPONSE_COMPLETE_FINAL: TRITONSERVER_ResponseCompleteFlag = 1;

/// `TRITONBACKEND_ArtifactType`.
pub type TRITONBACKEND_ArtifactType = u32;
pub const TRITONBACKEND_ARTIFACT_FILESYSTEM: TRITONBACKEND_ArtifactType = 0;

/// The `config_version` argument of [`TRITONBACKEND_ModelConfig`]: the header says only version
/// 1 is supported. (Our name; the header has no macro for it.)
pub const TRITONBACKEND_MODEL_CONFIG_VERSION: u32 = 1;

unsafe extern "C" {
    // ---- TRITONSERVER_Error ----------------------------------------------------------------

    /// The caller owns the new error: delete it, or return it from a backend entry point
    /// (Triton then owns it). `msg` is copied.
    pub fn TRITONSERVER_ErrorNew(
        code: TRITONSERVER_Error_Code,
        msg: *const c_char,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_ErrorDelete(error: *mut TRITONSERVER_Error);
    pub fn TRITONSERVER_ErrorCode(error: *mut TRITONSERVER_Error) -> TRITONSERVER_Error_Code;
    /// The string lives only as long as `error`.
    pub fn TRITONSERVER_ErrorMessage(error: *mut TRITONSERVER_Error) -> *const c_char;

    // ---- TRITONSERVER_Message --------------------------------------------------------------

    /// `base` points into `message` (not NUL-terminated by contract: use `byte_size`) and is
    /// valid only until the message is deleted.
    pub fn TRITONSERVER_MessageSerializeToJson(
        message: *mut TRITONSERVER_Message,
        base: *mut *const c_char,
        byte_size: *mut usize,
    ) -> *mut TRITONSERVER_Error;
    /// Only for messages the caller owns (e.g. from `TRITONBACKEND_ModelConfig`); never for the
    /// one from `TRITONBACKEND_BackendConfig`, which Triton owns.
    pub fn TRITONSERVER_MessageDelete(
        message: *mut TRITONSERVER_Message,
    ) -> *mut TRITONSERVER_Error;
    /// The server's model index as a message the caller owns (delete it).
    pub fn TRITONSERVER_ServerModelIndex(
        server: *mut TRITONSERVER_Server,
        flags: u32,
        model_index: *mut *mut TRITONSERVER_Message,
    ) -> *mut TRITONSERVER_Error;

    // ---- Logging ---------------------------------------------------------------------------

    pub fn TRITONSERVER_LogIsEnabled(level: TRITONSERVER_LogLevel) -> bool;
    pub fn TRITONSERVER_LogMessage(
        level: TRITONSERVER_LogLevel,
        filename: *const c_char,
        line: c_int,
        msg: *const c_char,
    ) -> *mut TRITONSERVER_Error;

    // ---- Data types ------------------------------------------------------------------------

    /// Zero for `TYPE_BYTES` (variable size) and `TYPE_INVALID`.
    pub fn TRITONSERVER_DataTypeByteSize(datatype: TRITONSERVER_DataType) -> u32;
    /// Not owned by the caller; never freed.
    pub fn TRITONSERVER_DataTypeString(datatype: TRITONSERVER_DataType) -> *const c_char;

    // ---- Parameters (metric labels) --------------------------------------------------------

    /// The caller owns the result (delete with `TRITONSERVER_ParameterDelete`); the value is
    /// copied. For `PARAMETER_STRING`, `value` is the `const char*` itself (not a pointer to
    /// it). Returns null for `PARAMETER_BYTES`.
    pub fn TRITONSERVER_ParameterNew(
        name: *const c_char,
        type_: TRITONSERVER_ParameterType,
        value: *const c_void,
    ) -> *mut TRITONSERVER_Parameter;
    pub fn TRITONSERVER_ParameterDelete(parameter: *mut TRITONSERVER_Parameter);

    // ---- Metrics ---------------------------------------------------------------------------

    /// The caller owns the family; delete it only after all of its metrics (deleting it first
    /// is an error).
    pub fn TRITONSERVER_MetricFamilyNew(
        family: *mut *mut TRITONSERVER_MetricFamily,
        kind: TRITONSERVER_MetricKind,
        name: *const c_char,
        description: *const c_char,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_MetricFamilyDelete(
        family: *mut TRITONSERVER_MetricFamily,
    ) -> *mut TRITONSERVER_Error;
    /// The caller owns the metric and keeps ownership of `labels` (STRING parameters), which
    /// may be deleted as soon as this returns.
    pub fn TRITONSERVER_MetricNew(
        metric: *mut *mut TRITONSERVER_Metric,
        family: *mut TRITONSERVER_MetricFamily,
        labels: *mut *const TRITONSERVER_Parameter,
        label_count: u64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_MetricDelete(metric: *mut TRITONSERVER_Metric) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_MetricValue(
        metric: *mut TRITONSERVER_Metric,
        value: *mut f64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_MetricIncrement(
        metric: *mut TRITONSERVER_Metric,
        value: f64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_MetricSet(
        metric: *mut TRITONSERVER_Metric,
        value: f64,
    ) -> *mut TRITONSERVER_Error;

    // ---- Buffer attributes (to read what TRITONBACKEND_InputBufferAttributes returns) -----

    pub fn TRITONSERVER_BufferAttributesMemoryType(
        buffer_attributes: *mut TRITONSERVER_BufferAttributes,
        memory_type: *mut TRITONSERVER_MemoryType,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_BufferAttributesMemoryTypeId(
        buffer_attributes: *mut TRITONSERVER_BufferAttributes,
        memory_type_id: *mut i64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONSERVER_BufferAttributesByteSize(
        buffer_attributes: *mut TRITONSERVER_BufferAttributes,
        byte_size: *mut usize,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND: API version and backend --------------------------------------------

    pub fn TRITONBACKEND_ApiVersion(major: *mut u32, minor: *mut u32) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_BackendName(
        backend: *mut TRITONBACKEND_Backend,
        name: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    /// The message is owned by Triton: do not delete it (unlike `TRITONBACKEND_ModelConfig`).
    pub fn TRITONBACKEND_BackendConfig(
        backend: *mut TRITONBACKEND_Backend,
        backend_config: *mut *mut TRITONSERVER_Message,
    ) -> *mut TRITONSERVER_Error;
    /// The state is owned by the backend; Triton only stores the pointer.
    pub fn TRITONBACKEND_BackendSetState(
        backend: *mut TRITONBACKEND_Backend,
        state: *mut c_void,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_BackendState(
        backend: *mut TRITONBACKEND_Backend,
        state: *mut *mut c_void,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND_Model ---------------------------------------------------------------

    pub fn TRITONBACKEND_ModelName(
        model: *mut TRITONBACKEND_Model,
        name: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelVersion(
        model: *mut TRITONBACKEND_Model,
        version: *mut u64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelRepository(
        model: *mut TRITONBACKEND_Model,
        artifact_type: *mut TRITONBACKEND_ArtifactType,
        location: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    /// The caller owns the returned message and must delete it with
    /// `TRITONSERVER_MessageDelete`.
    pub fn TRITONBACKEND_ModelConfig(
        model: *mut TRITONBACKEND_Model,
        config_version: u32,
        model_config: *mut *mut TRITONSERVER_Message,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelServer(
        model: *mut TRITONBACKEND_Model,
        server: *mut *mut TRITONSERVER_Server,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelBackend(
        model: *mut TRITONBACKEND_Model,
        backend: *mut *mut TRITONBACKEND_Backend,
    ) -> *mut TRITONSERVER_Error;
    /// The state is owned by the backend; Triton only stores the pointer.
    pub fn TRITONBACKEND_ModelSetState(
        model: *mut TRITONBACKEND_Model,
        state: *mut c_void,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelState(
        model: *mut TRITONBACKEND_Model,
        state: *mut *mut c_void,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND_ModelInstance -------------------------------------------------------

    pub fn TRITONBACKEND_ModelInstanceName(
        instance: *mut TRITONBACKEND_ModelInstance,
        name: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelInstanceKind(
        instance: *mut TRITONBACKEND_ModelInstance,
        kind: *mut TRITONSERVER_InstanceGroupKind,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelInstanceDeviceId(
        instance: *mut TRITONBACKEND_ModelInstance,
        device_id: *mut i32,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelInstanceModel(
        instance: *mut TRITONBACKEND_ModelInstance,
        model: *mut *mut TRITONBACKEND_Model,
    ) -> *mut TRITONSERVER_Error;
    /// The state is owned by the backend; Triton only stores the pointer.
    pub fn TRITONBACKEND_ModelInstanceSetState(
        instance: *mut TRITONBACKEND_ModelInstance,
        state: *mut c_void,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelInstanceState(
        instance: *mut TRITONBACKEND_ModelInstance,
        state: *mut *mut c_void,
    ) -> *mut TRITONSERVER_Error;
    /// Must be called before `request` is released. Timestamps: steady-clock nanoseconds.
    pub fn TRITONBACKEND_ModelInstanceReportStatistics(
        instance: *mut TRITONBACKEND_ModelInstance,
        request: *mut TRITONBACKEND_Request,
        success: bool,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_ModelInstanceReportBatchStatistics(
        instance: *mut TRITONBACKEND_ModelInstance,
        batch_size: u64,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND_Request -------------------------------------------------------------

    pub fn TRITONBACKEND_RequestId(
        request: *mut TRITONBACKEND_Request,
        id: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_RequestInputCount(
        request: *mut TRITONBACKEND_Request,
        count: *mut u32,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_RequestInputName(
        request: *mut TRITONBACKEND_Request,
        index: u32,
        input_name: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    /// A missing name is an `INVALID_ARG` error (not `NOT_FOUND`). The input lives as long as
    /// the request.
    pub fn TRITONBACKEND_RequestInput(
        request: *mut TRITONBACKEND_Request,
        name: *const c_char,
        input: *mut *mut TRITONBACKEND_Input,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_RequestInputByIndex(
        request: *mut TRITONBACKEND_Request,
        index: u32,
        input: *mut *mut TRITONBACKEND_Input,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_RequestOutputCount(
        request: *mut TRITONBACKEND_Request,
        count: *mut u32,
    ) -> *mut TRITONSERVER_Error;
    pub fn TRITONBACKEND_RequestOutputName(
        request: *mut TRITONBACKEND_Request,
        index: u32,
        output_name: *mut *const c_char,
    ) -> *mut TRITONSERVER_Error;
    /// On success Triton owns the request again and everything obtained from it (inputs,
    /// names, buffers) is invalid. On error the request was NOT released and the backend still
    /// owns it.
    pub fn TRITONBACKEND_RequestRelease(
        request: *mut TRITONBACKEND_Request,
        release_flags: u32,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND_Input ---------------------------------------------------------------

    /// Every out-pointer may be null. `shape` includes the batch dimension.
    pub fn TRITONBACKEND_InputProperties(
        input: *mut TRITONBACKEND_Input,
        name: *mut *const c_char,
        datatype: *mut TRITONSERVER_DataType,
        shape: *mut *const i64,
        dims_count: *mut u32,
        byte_size: *mut u64,
        buffer_count: *mut u32,
    ) -> *mut TRITONSERVER_Error;
    /// A null `host_policy_name` (or a policy without its own buffers) gives the fallback
    /// buffers, as `TRITONBACKEND_InputProperties` does.
    pub fn TRITONBACKEND_InputPropertiesForHostPolicy(
        input: *mut TRITONBACKEND_Input,
        host_policy_name: *const c_char,
        name: *mut *const c_char,
        datatype: *mut TRITONSERVER_DataType,
        shape: *mut *const i64,
        dims_count: *mut u32,
        byte_size: *mut u64,
        buffer_count: *mut u32,
    ) -> *mut TRITONSERVER_Error;
    /// `memory_type`/`memory_type_id` are in-out, but the core ignores the preference and
    /// overwrites them with where the buffer already is: it never copies. An out-of-range
    /// `index` is not an error: it yields a null buffer of size 0.
    pub fn TRITONBACKEND_InputBuffer(
        input: *mut TRITONBACKEND_Input,
        index: u32,
        buffer: *mut *const c_void,
        buffer_byte_size: *mut u64,
        memory_type: *mut TRITONSERVER_MemoryType,
        memory_type_id: *mut i64,
    ) -> *mut TRITONSERVER_Error;
    /// Pair with `TRITONBACKEND_InputPropertiesForHostPolicy` (same buffer count).
    pub fn TRITONBACKEND_InputBufferForHostPolicy(
        input: *mut TRITONBACKEND_Input,
        host_policy_name: *const c_char,
        index: u32,
        buffer: *mut *const c_void,
        buffer_byte_size: *mut u64,
        memory_type: *mut TRITONSERVER_MemoryType,
        memory_type_id: *mut i64,
    ) -> *mut TRITONSERVER_Error;
    /// The attributes are owned by the input; do not delete them.
    pub fn TRITONBACKEND_InputBufferAttributes(
        input: *mut TRITONBACKEND_Input,
        index: u32,
        buffer: *mut *const c_void,
        buffer_attributes: *mut *mut TRITONSERVER_BufferAttributes,
    ) -> *mut TRITONSERVER_Error;

    // ---- TRITONBACKEND_Output and TRITONBACKEND_Response -----------------------------------

    /// `memory_type`/`memory_type_id` are in-out: the preference goes in, where the buffer
    /// actually is comes out. The buffer is owned by the output (so by the response).
    pub fn TRITONBACKEND_OutputBuffer(
        output: *mut TRITONBACKEND_Output,
        buffer: *mut *mut c_void,
        buffer_byte_size: u64,
        memory_type: *mut TRITONSERVER_MemoryType,
        memory_type_id: *mut i64,
    ) -> *mut TRITONSERVER_Error;
    /// The caller owns the response until it is sent (`TRITONBACKEND_ResponseSend`) or
    /// deleted (`TRITONBACKEND_ResponseDelete`). All outputs of one response must be created
    /// before the next response for the same request is created.
    pub fn TRITONBACKEND_ResponseNew(
        response: *mut *mut TRITONBACKEND_Response,
        request: *mut TRITONBACKEND_Request,
    ) -> *mut TRITONSERVER_Error;
    /// Only for responses that were never sent.
    pub fn TRITONBACKEND_ResponseDelete(
        response: *mut TRITONBACKEND_Response,
    ) -> *mut TRITONSERVER_Error;
    /// The output lives as long as the response.
    pub fn TRITONBACKEND_ResponseOutput(
        response: *mut TRITONBACKEND_Response,
        output: *mut *mut TRITONBACKEND_Output,
        name: *const c_char,
        datatype: TRITONSERVER_DataType,
        shape: *const i64,
        dims_count: u32,
    ) -> *mut TRITONSERVER_Error;
    /// Takes ownership of `response` whatever it returns (the core wraps it in a
    /// `unique_ptr` first). `error` stays owned by the caller, who must delete it.
    pub fn TRITONBACKEND_ResponseSend(
        response: *mut TRITONBACKEND_Response,
        send_flags: u32,
        error: *mut TRITONSERVER_Error,
    ) -> *mut TRITONSERVER_Error;
}
