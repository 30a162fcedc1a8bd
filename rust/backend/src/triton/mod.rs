//! Thin, safe wrappers over the Triton C API declared in [`sys`].
//!
//! Conventions:
//! - Every fallible wrapper returns `Err(String)` naming the Triton call that failed; errors
//!   returned by Triton are read and deleted on the way.
//! - Handles to objects Triton owns and lends to us (`Backend`, `Model`, `Instance`) are `Copy`,
//!   `Send` and `Sync`, and made with `unsafe fn from_raw`; the pointer must be one Triton passed
//!   to an entry point, used only while Triton keeps the object alive. Their `set_state` is
//!   `unsafe`: Triton stores the state pointer in a plain field, so set it only in the matching
//!   Initialize/Finalize.
//! - `Request` is owned by the backend from a successful `ModelInstanceExecute` until
//!   [`Request::release`]; it has no `Drop` (returning an error from `ModelInstanceExecute`
//!   hands the requests back to Triton, so releasing them on drop would be wrong there).
//! - `Response` is owned until [`Response::send`]; dropping an unsent response deletes it.


pub mod sys;

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;

/// A Triton error object: null means success. Whoever holds a non-null one must delete it
/// (or return it from an entry point, which hands it to Triton).
pub type Error = *mut sys::TRITONSERVER_Error;

/// The backend API version this code is written against (`tritonbackend.h`, Triton 2.51).
pub const API_MAJOR: u32 = 1;
pub const API_MINOR: u32 = 19;

/// The "file" shown in Triton's log lines for our messages.
const LOG_FILE: &CStr = c"active_learning";

// ---- Strings -------------------------------------------------------------------------------

/// A C string for text that must get through whatever it holds (messages): NULs are escaped.
fn lossy_cstring(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| {
        // Cannot fail: the replacement leaves no NUL byte.
        CString::new(s.replace('\0', "\\0")).unwrap_or_default()
    })
}

/// A C string for a name Triton must see exactly: a NUL byte is an error.
fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

/// Copies a C string (null gives an empty string; invalid UTF-8 is replaced).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn string_from(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn to_usize(what: &str, n: u64) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("{what} ({n}) does not fit in memory"))
}

// ---- Errors --------------------------------------------------------------------------------

/// A new Triton error owned by the caller (return it from an entry point, or delete it).
pub fn new_error(code: sys::TRITONSERVER_Error_Code, msg: &str) -> Error {
    let msg = lossy_cstring(msg);
    // SAFETY: `msg` is a valid C string for the duration of the call; Triton copies it.
    unsafe { sys::TRITONSERVER_ErrorNew(code, msg.as_ptr()) }
}

/// The message of `err`, copied; `err` is not deleted.
///
/// # Safety
/// `err` is null or a live Triton error.
pub unsafe fn error_message(err: Error) -> String {
    if err.is_null() {
        return String::from("(no error)");
    }
    // SAFETY: `err` is a live error (contract); its message lives as long as `err` and is
    // copied before returning.
    unsafe { string_from(sys::TRITONSERVER_ErrorMessage(err)) }
}

/// `Ok` for null; otherwise reads the message, deletes `err`, and returns the message.
///
/// # Safety
/// `err` is null or a live Triton error owned by the caller; it must not be used afterwards.
pub unsafe fn check(err: Error) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: `err` is a live error we own (contract).
    let msg = unsafe { error_message(err) };
    // SAFETY: we own `err` and never touch it again.
    unsafe { sys::TRITONSERVER_ErrorDelete(err) };
    Err(msg)
}

/// A Triton getter's result: `f` gets a pointer to `init` to write through; its error, if
/// any, is read and deleted.
///
/// # Safety
/// `f` is a Triton call that, when it succeeds, has written a valid `T` through the pointer.
unsafe fn out<T>(what: &str, init: T, f: impl FnOnce(*mut T) -> Error) -> Result<T, String> {
    let mut value = init;
    // SAFETY: forwarded contract; `value` lives across the call.
    unsafe { call(what, f(&mut value)) }?;
    Ok(value)
}

/// [`check`] with the name of the call that produced `err` in the message.
///
/// # Safety
/// As for [`check`].
unsafe fn call(what: &str, err: Error) -> Result<(), String> {
    // SAFETY: forwarded contract.
    unsafe { check(err) }.map_err(|msg| format!("{what} failed: {msg}"))
}

// ---- Version, data types, clock ------------------------------------------------------------

/// The backend API version of the running server.
pub fn api_version() -> Result<(u32, u32), String> {
    let (mut major, mut minor) = (0u32, 0u32);
    // SAFETY: both out-pointers are valid for writes.
    unsafe {
        call(
            "TRITONBACKEND_ApiVersion",
            sys::TRITONBACKEND_ApiVersion(&mut major, &mut minor),
        )
    }?;
    Ok((major, minor))
}

/// True when a server with backend API `(major, minor)` can run this backend.
pub fn api_compatible((major, minor): (u32, u32)) -> bool {
    major == API_MAJOR && minor >= API_MINOR
}

/// "FP32", "BYTES", ... as Triton spells them ("<invalid>" for unknown values).
pub fn datatype_name(datatype: sys::TRITONSERVER_DataType) -> String {
    // SAFETY: takes a plain integer; returns null or a static string owned by Triton.
    unsafe { string_from(sys::TRITONSERVER_DataTypeString(datatype)) }
}

/// Bytes per element; 0 for BYTES (variable size) and INVALID.
pub fn datatype_byte_size(datatype: sys::TRITONSERVER_DataType) -> u32 {
    // SAFETY: takes and returns plain integers.
    unsafe { sys::TRITONSERVER_DataTypeByteSize(datatype) }
}

/// Monotonic nanoseconds on the clock Triton's statistics use (`std::chrono::steady_clock`,
/// which is `CLOCK_MONOTONIC` on Linux), so our timestamps compare with the server's own
/// (queue time is computed from both). 0 if the clock cannot be read.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub fn now_ns() -> u64 {
    use std::ffi::c_long;

    // glibc's `struct timespec` on 64-bit Linux: `time_t` and `long` are both 64-bit.
    #[repr(C)]
    struct Timespec {
        tv_sec: c_long,
        tv_nsec: c_long,
    }
    unsafe extern "C" {
        fn clock_gettime(clockid: c_int, tp: *mut Timespec) -> c_int;
    }
    const CLOCK_MONOTONIC: c_int = 1;

    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec`; the C library std links provides
    // `clock_gettime`.
    if unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Elsewhere: nanoseconds since the first call (monotonic, but not Triton's clock).
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub fn now_ns() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    let nanos = START.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

// ---- Logging -------------------------------------------------------------------------------

/// Whether Triton prints messages of `level` (verbose means `--log-verbose >= 1`).
pub fn log_enabled(level: sys::TRITONSERVER_LogLevel) -> bool {
    // SAFETY: takes a plain integer.
    unsafe { sys::TRITONSERVER_LogIsEnabled(level) }
}

/// Writes `msg` to Triton's log at `level`, attributed to `active_learning:<line>`.
pub fn log(level: sys::TRITONSERVER_LogLevel, line: u32, msg: &str) {
    let msg = lossy_cstring(msg);
    let line = c_int::try_from(line).unwrap_or(c_int::MAX);
    // SAFETY: both strings are valid C strings for the duration of the call.
    let err = unsafe { sys::TRITONSERVER_LogMessage(level, LOG_FILE.as_ptr(), line, msg.as_ptr()) };
    // Nowhere to report a logging failure: drop it.
    // SAFETY: `err` is null or an error we own.
    let _ = unsafe { check(err) };
}

/// For the macros: formats only when the level is enabled.
pub fn log_fmt(level: sys::TRITONSERVER_LogLevel, line: u32, args: fmt::Arguments<'_>) {
    if log_enabled(level) {
        log(level, line, &args.to_string());
    }
}

/// `log_info!("format", args...)`: an INFO line in Triton's log.
macro_rules! log_info {
    ($($arg:tt)*) => {
        $crate::triton::log_fmt($crate::triton::sys::TRITONSERVER_LOG_INFO, line!(), format_args!($($arg)*))
    };
}
/// `log_warn!("format", args...)`: a WARNING line in Triton's log.
macro_rules! log_warn {
    ($($arg:tt)*) => {
        $crate::triton::log_fmt($crate::triton::sys::TRITONSERVER_LOG_WARN, line!(), format_args!($($arg)*))
    };
}
/// `log_error!("format", args...)`: an ERROR line in Triton's log.
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::triton::log_fmt($crate::triton::sys::TRITONSERVER_LOG_ERROR, line!(), format_args!($($arg)*))
    };
}
#[allow(unused_imports)]
pub(crate) use {log_error, log_info, log_warn};

// ---- Messages ------------------------------------------------------------------------------

/// The JSON text of `message` (not deleted here).
///
/// # Safety
/// `message` is a live Triton message.
unsafe fn message_json(message: *mut sys::TRITONSERVER_Message) -> Result<String, String> {
    let mut base: *const c_char = ptr::null();
    let mut size: usize = 0;
    // SAFETY: `message` is live (contract); out-pointers are valid for writes.
    unsafe {
        call(
            "TRITONSERVER_MessageSerializeToJson",
            sys::TRITONSERVER_MessageSerializeToJson(message, &mut base, &mut size),
        )
    }?;
    if size == 0 {
        return Ok(String::new());
    }
    if base.is_null() {
        return Err("TRITONSERVER_MessageSerializeToJson returned no buffer".into());
    }
    // SAFETY: Triton returned `size` readable bytes at `base`, owned by `message`, which is
    // alive for this call; they are copied out before returning.
    let bytes = unsafe { std::slice::from_raw_parts(base.cast::<u8>(), size) };
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// The ready models of the server as JSON (`[{"name", "version", "state"}, ...]`).
pub fn ready_model_index(server: *mut sys::TRITONSERVER_Server) -> Result<String, String> {
    let mut message: *mut sys::TRITONSERVER_Message = ptr::null_mut();
    // SAFETY: `server` came from TRITONBACKEND_ModelServer and outlives every model; the
    // out-pointer is valid for writes.
    unsafe {
        call(
            "TRITONSERVER_ServerModelIndex",
            sys::TRITONSERVER_ServerModelIndex(server, sys::TRITONSERVER_INDEX_FLAG_READY, &mut message),
        )
    }?;
    if message.is_null() {
        return Err("TRITONSERVER_ServerModelIndex returned no message".into());
    }
    // SAFETY: we own `message`; it is read, then deleted once.
    let json = unsafe { message_json(message) };
    // SAFETY: as above.
    let _ = unsafe { check(sys::TRITONSERVER_MessageDelete(message)) };
    json
}

// ---- Backend -------------------------------------------------------------------------------

/// The backend (`TRITONBACKEND_Backend*`), lent by Triton.
#[derive(Clone, Copy, Debug)]
pub struct Backend(*mut sys::TRITONBACKEND_Backend);

// SAFETY: a handle to an object Triton keeps alive while the backend is loaded. Its getters read
// fields fixed at load time; the one writer, `set_state`, is `unsafe` and documented as
// init/finalize-only.
unsafe impl Send for Backend {}
// SAFETY: as above.
unsafe impl Sync for Backend {}

impl Backend {
    /// # Safety
    /// `ptr` is the backend Triton passed to an entry point (or one it returned), used only
    /// while the backend is loaded.
    pub unsafe fn from_raw(ptr: *mut sys::TRITONBACKEND_Backend) -> Self {
        Backend(ptr)
    }

    pub fn name(&self) -> Result<String, String> {
        let mut name: *const c_char = ptr::null();
        // SAFETY: `self.0` is a live backend (from_raw contract); out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_BackendName",
                sys::TRITONBACKEND_BackendName(self.0, &mut name),
            )
        }?;
        // SAFETY: the name is owned by the backend and copied now.
        Ok(unsafe { string_from(name) })
    }

}

// ---- Model ---------------------------------------------------------------------------------

/// A model (`TRITONBACKEND_Model*`), lent by Triton between ModelInitialize and ModelFinalize.
#[derive(Clone, Copy, Debug)]
pub struct Model(*mut sys::TRITONBACKEND_Model);

// SAFETY: a handle to an object Triton keeps alive while the model is loaded, and Triton itself
// runs the instances of one model on several threads at once. Its getters read fields fixed at
// load time; the one writer, `set_state`, is `unsafe` and documented as init/finalize-only.
unsafe impl Send for Model {}
// SAFETY: as above.
unsafe impl Sync for Model {}

impl Model {
    /// # Safety
    /// `ptr` is a model Triton passed to an entry point (or returned), used only while it is
    /// loaded.
    pub unsafe fn from_raw(ptr: *mut sys::TRITONBACKEND_Model) -> Self {
        Model(ptr)
    }

    pub fn name(&self) -> Result<String, String> {
        let mut name: *const c_char = ptr::null();
        // SAFETY: `self.0` is a live model (from_raw contract); out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelName",
                sys::TRITONBACKEND_ModelName(self.0, &mut name),
            )
        }?;
        // SAFETY: the name is owned by the model and copied now.
        Ok(unsafe { string_from(name) })
    }

    /// The model's directory in the repository (`<repo>/<model>`, not the version folder).
    pub fn repository_path(&self) -> Result<String, String> {
        let mut kind: sys::TRITONBACKEND_ArtifactType = sys::TRITONBACKEND_ARTIFACT_FILESYSTEM;
        let mut location: *const c_char = ptr::null();
        // SAFETY: live model; out-pointers valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelRepository",
                sys::TRITONBACKEND_ModelRepository(self.0, &mut kind, &mut location),
            )
        }?;
        if kind != sys::TRITONBACKEND_ARTIFACT_FILESYSTEM {
            return Err(format!(
                "TRITONBACKEND_ModelRepository: unsupported artifact type {kind}"
            ));
        }
        // SAFETY: the location is owned by Triton and copied now.
        Ok(unsafe { string_from(location) })
    }

    /// The model configuration as JSON (config format version 1).
    pub fn config_json(&self) -> Result<String, String> {
        let mut message: *mut sys::TRITONSERVER_Message = ptr::null_mut();
        // SAFETY: live model; out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelConfig",
                sys::TRITONBACKEND_ModelConfig(
                    self.0,
                    sys::TRITONBACKEND_MODEL_CONFIG_VERSION,
                    &mut message,
                ),
            )
        }?;
        if message.is_null() {
            return Err("TRITONBACKEND_ModelConfig returned no message".into());
        }
        // SAFETY: we own `message` (ModelConfig hands it to the caller); read it, then delete
        // it exactly once.
        let json = unsafe { message_json(message) };
        // SAFETY: as above; `message` is not used after this.
        let deleted = unsafe {
            call(
                "TRITONSERVER_MessageDelete",
                sys::TRITONSERVER_MessageDelete(message),
            )
        };
        let json = json?;
        deleted?;
        Ok(json)
    }

    /// The server serving this model (raw: we wrap no server calls).
    pub fn server(&self) -> Result<*mut sys::TRITONSERVER_Server, String> {
        // SAFETY: live model; out-pointer valid.
        unsafe { out::<*mut sys::TRITONSERVER_Server>("TRITONBACKEND_ModelServer", ptr::null_mut(), |server| sys::TRITONBACKEND_ModelServer(self.0, server)) }
    }

    /// Stores an opaque pointer the backend owns (free it in ModelFinalize).
    ///
    /// # Safety
    /// No other thread reads or sets the model state at the same time (Triton keeps a plain
    /// field): call it from ModelInitialize/ModelFinalize only.
    pub unsafe fn set_state(&self, state: *mut c_void) -> Result<(), String> {
        // SAFETY: live model; no concurrent state access (contract); Triton only stores it.
        unsafe {
            call(
                "TRITONBACKEND_ModelSetState",
                sys::TRITONBACKEND_ModelSetState(self.0, state),
            )
        }
    }

    pub fn state(&self) -> Result<*mut c_void, String> {
        // SAFETY: live model; out-pointer valid.
        unsafe { out::<*mut c_void>("TRITONBACKEND_ModelState", ptr::null_mut(), |state| sys::TRITONBACKEND_ModelState(self.0, state)) }
    }
}

// ---- Model instance ------------------------------------------------------------------------

/// A model instance (`TRITONBACKEND_ModelInstance*`), lent by Triton between
/// ModelInstanceInitialize and ModelInstanceFinalize.
#[derive(Clone, Copy, Debug)]
pub struct Instance(*mut sys::TRITONBACKEND_ModelInstance);

// SAFETY: a handle to an object Triton keeps alive until ModelInstanceFinalize. Its getters read
// fields fixed at creation; statistics go to the model's stats aggregator, which locks a mutex
// (src/infer_stats.cc), and to prometheus-cpp atomics. The one writer, `set_state`, is `unsafe`
// and documented as init/finalize-only.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    /// # Safety
    /// `ptr` is an instance Triton passed to an entry point, used only while it exists.
    pub unsafe fn from_raw(ptr: *mut sys::TRITONBACKEND_ModelInstance) -> Self {
        Instance(ptr)
    }

    pub fn model(&self) -> Result<Model, String> {
        let mut model: *mut sys::TRITONBACKEND_Model = ptr::null_mut();
        // SAFETY: `self.0` is a live instance (from_raw contract); out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelInstanceModel",
                sys::TRITONBACKEND_ModelInstanceModel(self.0, &mut model),
            )
        }?;
        if model.is_null() {
            return Err("TRITONBACKEND_ModelInstanceModel returned no model".into());
        }
        // The model outlives its instances.
        Ok(Model(model))
    }

    pub fn name(&self) -> Result<String, String> {
        let mut name: *const c_char = ptr::null();
        // SAFETY: live instance; out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelInstanceName",
                sys::TRITONBACKEND_ModelInstanceName(self.0, &mut name),
            )
        }?;
        // SAFETY: the name is owned by the instance and copied now.
        Ok(unsafe { string_from(name) })
    }

    /// `sys::TRITONSERVER_INSTANCEGROUPKIND_*`.
    pub fn kind(&self) -> Result<sys::TRITONSERVER_InstanceGroupKind, String> {
        let mut kind: sys::TRITONSERVER_InstanceGroupKind =
            sys::TRITONSERVER_INSTANCEGROUPKIND_AUTO;
        // SAFETY: live instance; out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ModelInstanceKind",
                sys::TRITONBACKEND_ModelInstanceKind(self.0, &mut kind),
            )
        }?;
        Ok(kind)
    }

    /// Per-request statistics; call before releasing `request`. Timestamps from [`now_ns`]
    /// (ignored by Triton when `success` is false).
    pub fn report_statistics(
        &self,
        request: &Request,
        success: bool,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> Result<(), String> {
        // SAFETY: live instance; `request` is a live request we own (borrowed, so unreleased).
        unsafe {
            call(
                "TRITONBACKEND_ModelInstanceReportStatistics",
                sys::TRITONBACKEND_ModelInstanceReportStatistics(
                    self.0,
                    request.0,
                    success,
                    exec_start_ns,
                    compute_start_ns,
                    compute_end_ns,
                    exec_end_ns,
                ),
            )
        }
    }

    /// Statistics for one ModelInstanceExecute call; `batch_size` is the sum of the requests'
    /// batch sizes.
    pub fn report_batch_statistics(
        &self,
        batch_size: u64,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> Result<(), String> {
        // SAFETY: live instance; the rest are plain integers.
        unsafe {
            call(
                "TRITONBACKEND_ModelInstanceReportBatchStatistics",
                sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
                    self.0,
                    batch_size,
                    exec_start_ns,
                    compute_start_ns,
                    compute_end_ns,
                    exec_end_ns,
                ),
            )
        }
    }
}

// ---- Request and inputs --------------------------------------------------------------------

/// An inference request owned by the backend: release it exactly once with
/// [`Request::release`] (after sending its response).
#[derive(Debug)]
pub struct Request(*mut sys::TRITONBACKEND_Request);

// SAFETY: after a successful ModelInstanceExecute the backend owns the request and the API does
// not tie it to the executing thread (the header's own pattern of releasing requests and
// sending responses later needs that). Not `Sync`: the core's request object has no locking,
// so it is used from one thread at a time.
unsafe impl Send for Request {}

impl Request {

    /// Copies the request pointers out of ModelInstanceExecute's array (the array itself goes
    /// back to Triton when ModelInstanceExecute returns). Null entries are skipped.
    ///
    /// # Safety
    /// `requests` points to `count` request pointers, with the ownership condition of
    /// [`Request::from_raw`] for each.
    pub unsafe fn from_raw_array(
        requests: *mut *mut sys::TRITONBACKEND_Request,
        count: u32,
    ) -> Vec<Request> {
        if requests.is_null() || count == 0 {
            return Vec::new();
        }
        let Ok(len) = usize::try_from(count) else {
            return Vec::new();
        };
        // SAFETY: `requests` points to `count` readable pointers (contract).
        let raw = unsafe { std::slice::from_raw_parts(requests, len) };
        raw.iter()
            .filter(|p| !p.is_null())
            .map(|&p| Request(p))
            .collect()
    }

    pub fn input_count(&self) -> Result<u32, String> {
        // SAFETY: live request; out-pointer valid.
        unsafe { out("TRITONBACKEND_RequestInputCount", 0u32, |count| sys::TRITONBACKEND_RequestInputCount(self.0, count)) }
    }

    /// The name of input `index` (0 <= index < input_count), borrowed from the request.
    fn input_name_at(&self, index: u32) -> Result<&CStr, String> {
        let mut name: *const c_char = ptr::null();
        // SAFETY: live request; out-pointer valid; an out-of-range index is an error.
        unsafe {
            call(
                "TRITONBACKEND_RequestInputName",
                sys::TRITONBACKEND_RequestInputName(self.0, index, &mut name),
            )
        }?;
        if name.is_null() {
            return Err(format!(
                "TRITONBACKEND_RequestInputName returned no name for input {index}"
            ));
        }
        // SAFETY: non-null, NUL-terminated, owned by the request, which `&self` keeps unreleased.
        Ok(unsafe { CStr::from_ptr(name) })
    }

    /// The input called `name`, or `None` when the request does not carry it.
    pub fn input(&self, name: &str) -> Result<Option<Input<'_>>, String> {
        // Look the name up first: TRITONBACKEND_RequestInput reports a missing name as a
        // generic INVALID_ARG error, which cannot be told apart from other failures.
        for index in 0..self.input_count()? {
            if self.input_name_at(index)?.to_bytes() != name.as_bytes() {
                continue;
            }
            let mut input: *mut sys::TRITONBACKEND_Input = ptr::null_mut();
            // SAFETY: live request; `index` < input count; out-pointer valid.
            unsafe {
                call(
                    "TRITONBACKEND_RequestInputByIndex",
                    sys::TRITONBACKEND_RequestInputByIndex(self.0, index, &mut input),
                )
            }?;
            if input.is_null() {
                return Err(format!(
                    "TRITONBACKEND_RequestInputByIndex returned no input for {name:?}"
                ));
            }
            // SAFETY: `input` belongs to this request and lives until it is released, which the
            // returned borrow of `self` prevents.
            return unsafe { Input::from_raw(input) }.map(Some);
        }
        Ok(None)
    }

    /// The outputs the client asked for (all of the model's outputs when it named none).
    pub fn requested_output_names(&self) -> Result<Vec<String>, String> {
        let mut count = 0u32;
        // SAFETY: live request; out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_RequestOutputCount",
                sys::TRITONBACKEND_RequestOutputCount(self.0, &mut count),
            )
        }?;
        let mut names = Vec::with_capacity(to_usize("output count", u64::from(count))?);
        for index in 0..count {
            let mut name: *const c_char = ptr::null();
            // SAFETY: live request; index < count; out-pointer valid.
            unsafe {
                call(
                    "TRITONBACKEND_RequestOutputName",
                    sys::TRITONBACKEND_RequestOutputName(self.0, index, &mut name),
                )
            }?;
            // SAFETY: the name is owned by the request and copied now.
            names.push(unsafe { string_from(name) });
        }
        Ok(names)
    }

    /// Hands the request back to Triton (`flags`: usually `sys::TRITONSERVER_REQUEST_RELEASE_ALL`).
    /// On `Err` Triton did not take it back; the pointer is dropped (leaked) with the wrapper,
    /// since retrying would fail the same way.
    pub fn release(self, flags: u32) -> Result<(), String> {
        // SAFETY: `self.0` is a live request we own; consuming `self` ends every borrow of it
        // (inputs, buffers), so nothing touches it after a successful release.
        unsafe {
            call(
                "TRITONBACKEND_RequestRelease",
                sys::TRITONBACKEND_RequestRelease(self.0, flags),
            )
        }
    }
}

/// A request input, valid while the request is (borrowed from it).
pub struct Input<'a> {
    ptr: *mut sys::TRITONBACKEND_Input,
    name: String,
    datatype: sys::TRITONSERVER_DataType,
    shape: Vec<i64>,
    byte_size: u64,
    buffer_count: u32,
    _request: PhantomData<&'a Request>,
}

impl fmt::Debug for Input<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Input")
            .field("name", &self.name)
            .field("datatype", &datatype_name(self.datatype))
            .field("shape", &self.shape)
            .field("byte_size", &self.byte_size)
            .field("buffer_count", &self.buffer_count)
            .finish()
    }
}

impl<'a> Input<'a> {
    /// Reads the input's properties once.
    ///
    /// # Safety
    /// `ptr` is an input of a request that stays unreleased for `'a`.
    unsafe fn from_raw(ptr: *mut sys::TRITONBACKEND_Input) -> Result<Input<'a>, String> {
        let mut name: *const c_char = ptr::null();
        let mut datatype: sys::TRITONSERVER_DataType = sys::TRITONSERVER_TYPE_INVALID;
        let mut shape: *const i64 = ptr::null();
        let mut dims: u32 = 0;
        let mut byte_size: u64 = 0;
        let mut buffer_count: u32 = 0;
        // SAFETY: `ptr` is a live input (contract); every out-pointer is valid for writes.
        unsafe {
            call(
                "TRITONBACKEND_InputProperties",
                sys::TRITONBACKEND_InputProperties(
                    ptr,
                    &mut name,
                    &mut datatype,
                    &mut shape,
                    &mut dims,
                    &mut byte_size,
                    &mut buffer_count,
                ),
            )
        }?;
        // SAFETY: the name is owned by the input and copied now.
        let name = unsafe { string_from(name) };
        let shape = if dims == 0 || shape.is_null() {
            Vec::new()
        } else {
            let dims = to_usize("dimension count", u64::from(dims))?;
            // SAFETY: Triton returned `dims` readable i64s at `shape`, owned by the input;
            // copied now.
            unsafe { std::slice::from_raw_parts(shape, dims) }.to_vec()
        };
        Ok(Input {
            ptr,
            name,
            datatype,
            shape,
            byte_size,
            buffer_count,
            _request: PhantomData,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sys::TRITONSERVER_TYPE_*`.
    pub fn datatype(&self) -> sys::TRITONSERVER_DataType {
        self.datatype
    }

    /// The shape, batch dimension included.
    pub fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }

    /// Buffer `index` as bytes in host memory (CPU or pinned CPU). Triton never copies here:
    /// a buffer in GPU memory is an error.
    pub fn buffer(&self, index: u32) -> Result<&'a [u8], String> {
        if index >= self.buffer_count {
            return Err(format!(
                "input {}: buffer {index} requested but it has {} buffers",
                self.name, self.buffer_count
            ));
        }
        let mut base: *const c_void = ptr::null();
        let mut size: u64 = 0;
        // In-out: ask for CPU memory (the core ignores the wish and reports where the data is).
        let mut memory_type: sys::TRITONSERVER_MemoryType = sys::TRITONSERVER_MEMORY_CPU;
        let mut memory_type_id: i64 = 0;
        // SAFETY: `self.ptr` is a live input ('a keeps its request unreleased); index is in
        // range; every out-pointer is valid for writes.
        unsafe {
            call(
                "TRITONBACKEND_InputBuffer",
                sys::TRITONBACKEND_InputBuffer(
                    self.ptr,
                    index,
                    &mut base,
                    &mut size,
                    &mut memory_type,
                    &mut memory_type_id,
                ),
            )
        }?;
        match memory_type {
            sys::TRITONSERVER_MEMORY_CPU | sys::TRITONSERVER_MEMORY_CPU_PINNED => {}
            sys::TRITONSERVER_MEMORY_GPU => {
                return Err(format!(
                    "input {} is in GPU memory (device {memory_type_id}, buffer {index} of {}); \
                     this backend reads inputs from CPU memory only (send the input through \
                     system memory, not CUDA shared memory)",
                    self.name, self.buffer_count
                ));
            }
            other => {
                return Err(format!(
                    "input {}: buffer {index} is in unknown memory type {other}",
                    self.name
                ));
            }
        }
        let len = to_usize("input buffer size", size)?;
        if len == 0 {
            return Ok(&[]);
        }
        if base.is_null() {
            return Err(format!(
                "input {}: TRITONBACKEND_InputBuffer returned no data for buffer {index}",
                self.name
            ));
        }
        // SAFETY: Triton returned `len` readable bytes at `base` in host memory (checked above),
        // owned by the input, which lives as long as its request: `'a` keeps the request
        // unreleased. Triton does not write input buffers while the backend holds the request.
        Ok(unsafe { std::slice::from_raw_parts(base.cast::<u8>(), len) })
    }

    /// The whole input as bytes in host memory: borrowed when it is one buffer, gathered into
    /// a `Vec` when it is several. Neither is guaranteed to be aligned for wider types: decode
    /// elements (e.g. `f32::from_le_bytes`) rather than casting to `&[f32]`.
    pub fn bytes(&self) -> Result<Cow<'a, [u8]>, String> {
        let total = to_usize("input byte size", self.byte_size)?;
        let parts = (0..self.buffer_count)
            .map(|i| self.buffer(i))
            .collect::<Result<Vec<_>, _>>()?;
        let sum = parts.iter().map(|p| p.len()).sum::<usize>();
        if sum != total {
            return Err(format!(
                "input {}: its {} buffers hold {sum} bytes but its byte size is {total}",
                self.name, self.buffer_count
            ));
        }
        Ok(match parts.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(*one),
            several => {
                let mut gathered = Vec::with_capacity(total);
                for part in several {
                    gathered.extend_from_slice(part);
                }
                Cow::Owned(gathered)
            }
        })
    }
}

// ---- Response ------------------------------------------------------------------------------

/// A response being built. Send it with [`Response::send`]; dropping it unsent deletes it.
/// Create, fill and send it before releasing its request.
#[derive(Debug)]
pub struct Response {
    ptr: *mut sys::TRITONBACKEND_Response,
}

// SAFETY: tritonbackend.h: "The backend may generate responses in parallel on multiple threads
// as long as those responses are for different requests"; once created, a response may be sent
// later, from anywhere. Not `Sync`: outputs of one response must be added sequentially, which
// `&mut self` enforces.
unsafe impl Send for Response {}

impl Response {
    /// A new response for `request`. All outputs of this response must be created before
    /// another response for the same request is created.
    pub fn new(request: &Request) -> Result<Response, String> {
        let mut response: *mut sys::TRITONBACKEND_Response = ptr::null_mut();
        // SAFETY: `request.0` is a live request we own; out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ResponseNew",
                sys::TRITONBACKEND_ResponseNew(&mut response, request.0),
            )
        }?;
        if response.is_null() {
            return Err("TRITONBACKEND_ResponseNew returned no response".into());
        }
        Ok(Response { ptr: response })
    }

    /// Adds output `name` and returns its buffer of `byte_size` bytes in host memory (zeroed),
    /// to fill before sending. An `Err` after the output was added leaves the response
    /// unusable for success: send it with an error instead.
    pub fn output_buffer(
        &mut self,
        name: &str,
        datatype: sys::TRITONSERVER_DataType,
        shape: &[i64],
        byte_size: usize,
    ) -> Result<&mut [u8], String> {
        let cname = cstring("output name", name)?;
        let dims = u32::try_from(shape.len())
            .map_err(|_| format!("output {name}: too many dimensions"))?;
        let mut output: *mut sys::TRITONBACKEND_Output = ptr::null_mut();
        // SAFETY: `self.ptr` is a live unsent response we own; `cname` and `shape` are valid for
        // the call (Triton copies both); out-pointer valid.
        unsafe {
            call(
                "TRITONBACKEND_ResponseOutput",
                sys::TRITONBACKEND_ResponseOutput(
                    self.ptr,
                    &mut output,
                    cname.as_ptr(),
                    datatype,
                    shape.as_ptr(),
                    dims,
                ),
            )
        }?;
        if output.is_null() {
            return Err(format!(
                "TRITONBACKEND_ResponseOutput returned no output for {name}"
            ));
        }
        let mut buffer: *mut c_void = ptr::null_mut();
        let mut memory_type: sys::TRITONSERVER_MemoryType = sys::TRITONSERVER_MEMORY_CPU;
        let mut memory_type_id: i64 = 0;
        // SAFETY: `output` belongs to our live response; out-pointers valid.
        unsafe {
            call(
                "TRITONBACKEND_OutputBuffer",
                sys::TRITONBACKEND_OutputBuffer(
                    output,
                    &mut buffer,
                    byte_size as u64,
                    &mut memory_type,
                    &mut memory_type_id,
                ),
            )
        }
        .map_err(|e| format!("output {name}: {e}"))?;
        match memory_type {
            sys::TRITONSERVER_MEMORY_CPU | sys::TRITONSERVER_MEMORY_CPU_PINNED => {}
            other => {
                return Err(format!(
                    "output {name}: Triton allocated it in memory type {other} (device \
                     {memory_type_id}), not CPU memory"
                ));
            }
        }
        if byte_size == 0 {
            return Ok(&mut []);
        }
        if buffer.is_null() {
            return Err(format!(
                "output {name}: TRITONBACKEND_OutputBuffer returned no buffer"
            ));
        }
        // SAFETY: Triton returned `byte_size` writable bytes of host memory at `buffer`, owned by
        // the output and so by this response; zeroing them first makes them valid `u8`s. The
        // slice borrows `self` mutably, so the response cannot be sent or dropped, nor another
        // output added, while it is alive.
        unsafe {
            ptr::write_bytes(buffer.cast::<u8>(), 0, byte_size);
            Ok(std::slice::from_raw_parts_mut(
                buffer.cast::<u8>(),
                byte_size,
            ))
        }
    }

    /// Sends the response as the final one for its request: a success, or an error response
    /// (code INTERNAL) carrying `error`. The response is consumed either way.
    pub fn send(self, error: Option<&str>) -> Result<(), String> {
        match error {
            None => self.send_raw(ptr::null_mut()),
            Some(msg) => self.send_error(sys::TRITONSERVER_ERROR_INTERNAL, msg),
        }
    }

    /// Sends an error response with `code` (e.g. `sys::TRITONSERVER_ERROR_INVALID_ARG` for a
    /// bad input, which clients see as HTTP 400 / gRPC INVALID_ARGUMENT). Consumed either way.
    pub fn send_error(self, code: sys::TRITONSERVER_Error_Code, msg: &str) -> Result<(), String> {
        let err = new_error(code, msg);
        let sent = self.send_raw(err);
        // SAFETY: ResponseSend leaves `err` owned by the caller; we delete it once.
        let _ = unsafe { check(err) };
        sent
    }

    fn send_raw(mut self, err: Error) -> Result<(), String> {
        let response = std::mem::replace(&mut self.ptr, ptr::null_mut());
        // SAFETY: `response` is a live unsent response we own. TRITONBACKEND_ResponseSend takes
        // it whatever it returns (backend_model.cc wraps it in a unique_ptr first), so it is
        // never touched again: `self.ptr` is now null and Drop does nothing. `err` is null or a
        // live error that stays ours.
        unsafe {
            call(
                "TRITONBACKEND_ResponseSend",
                sys::TRITONBACKEND_ResponseSend(
                    response,
                    sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                    err,
                ),
            )
        }
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        let response = std::mem::replace(&mut self.ptr, ptr::null_mut());
        // SAFETY: an unsent response we own; deleted exactly once.
        if let Err(e) = unsafe {
            call(
                "TRITONBACKEND_ResponseDelete",
                sys::TRITONBACKEND_ResponseDelete(response),
            )
        } {
            log(sys::TRITONSERVER_LOG_ERROR, line!(), &e);
        }
    }
}

/// Answers `request` with an error response (code INTERNAL); logs if even that fails.
pub fn send_error_response(request: &Request, msg: &str) {
    send_error_response_with_code(request, sys::TRITONSERVER_ERROR_INTERNAL, msg);
}

/// [`send_error_response`] with an explicit error code.
pub fn send_error_response_with_code(
    request: &Request,
    code: sys::TRITONSERVER_Error_Code,
    msg: &str,
) {
    let sent = Response::new(request).and_then(|response| response.send_error(code, msg));
    if let Err(e) = sent {
        log(
            sys::TRITONSERVER_LOG_ERROR,
            line!(),
            &format!("could not send the error response {msg:?}: {e}"),
        );
    }
}

// ---- Metrics -------------------------------------------------------------------------------

/// Owns a `TRITONSERVER_MetricFamily*`; shared by the family handle and its metrics so the
/// family is deleted only after its last metric.
#[derive(Debug)]
struct FamilyHandle(*mut sys::TRITONSERVER_MetricFamily);

// SAFETY: the header says nothing on thread safety; the core (src/metric_family.cc) guards the
// family's bookkeeping with a mutex and prometheus-cpp's families are internally locked.
unsafe impl Send for FamilyHandle {}
// SAFETY: as above; `&FamilyHandle` only exposes the pointer to MetricNew, which locks.
unsafe impl Sync for FamilyHandle {}

impl Drop for FamilyHandle {
    fn drop(&mut self) {
        // SAFETY: we own the family, and every metric holds an Arc to this handle, so all of
        // them have been deleted before this runs; deleted exactly once.
        if let Err(e) = unsafe {
            call(
                "TRITONSERVER_MetricFamilyDelete",
                sys::TRITONSERVER_MetricFamilyDelete(self.0),
            )
        } {
            log(sys::TRITONSERVER_LOG_ERROR, line!(), &e);
        }
    }
}

/// A metric family (a name on Triton's `/metrics` endpoint). Cloning shares it.
#[derive(Clone, Debug)]
pub struct MetricFamily(Arc<FamilyHandle>);

impl MetricFamily {
    /// A counter family (`name` must be a valid Prometheus name, e.g. `al_selected_total`).
    pub fn counter(name: &str, description: &str) -> Result<MetricFamily, String> {
        Self::new(sys::TRITONSERVER_METRIC_KIND_COUNTER, name, description)
    }

    fn new(
        kind: sys::TRITONSERVER_MetricKind,
        name: &str,
        description: &str,
    ) -> Result<MetricFamily, String> {
        let cname = cstring("metric family name", name)?;
        let cdescription = lossy_cstring(description);
        let mut family: *mut sys::TRITONSERVER_MetricFamily = ptr::null_mut();
        // SAFETY: both strings are valid for the call (copied by Triton); out-pointer valid.
        unsafe {
            call(
                "TRITONSERVER_MetricFamilyNew",
                sys::TRITONSERVER_MetricFamilyNew(
                    &mut family,
                    kind,
                    cname.as_ptr(),
                    cdescription.as_ptr(),
                ),
            )
        }
        .map_err(|e| format!("metric family {name}: {e}"))?;
        if family.is_null() {
            return Err(format!(
                "TRITONSERVER_MetricFamilyNew returned no family for {name}"
            ));
        }
        Ok(MetricFamily(Arc::new(FamilyHandle(family))))
    }

    /// A metric of this family with the given `(label, value)` pairs.
    pub fn metric(&self, labels: &[(&str, &str)]) -> Result<Metric, String> {
        // Owns the label parameters until MetricNew has copied them.
        struct Labels(Vec<*mut sys::TRITONSERVER_Parameter>);
        impl Drop for Labels {
            fn drop(&mut self) {
                for &p in &self.0 {
                    // SAFETY: each pointer came from ParameterNew, is owned here and deleted once.
                    unsafe { sys::TRITONSERVER_ParameterDelete(p) };
                }
            }
        }

        let mut params = Labels(Vec::with_capacity(labels.len()));
        for (key, value) in labels {
            let ckey = cstring("metric label name", key)?;
            let cvalue = lossy_cstring(value);
            // SAFETY: both strings are valid for the call; for PARAMETER_STRING `value` is the
            // C string itself, and Triton copies it.
            let p = unsafe {
                sys::TRITONSERVER_ParameterNew(
                    ckey.as_ptr(),
                    sys::TRITONSERVER_PARAMETER_STRING,
                    cvalue.as_ptr().cast::<c_void>(),
                )
            };
            if p.is_null() {
                return Err(format!("TRITONSERVER_ParameterNew failed for label {key}"));
            }
            params.0.push(p);
        }
        let mut label_ptrs: Vec<*const sys::TRITONSERVER_Parameter> =
            params.0.iter().map(|&p| p.cast_const()).collect();
        let mut metric: *mut sys::TRITONSERVER_Metric = ptr::null_mut();
        // SAFETY: the family is live (we hold its Arc); `label_ptrs` holds `len` live
        // parameters for the duration of the call; out-pointer valid.
        unsafe {
            call(
                "TRITONSERVER_MetricNew",
                sys::TRITONSERVER_MetricNew(
                    &mut metric,
                    (self.0).0,
                    label_ptrs.as_mut_ptr(),
                    label_ptrs.len() as u64,
                ),
            )
        }?;
        if metric.is_null() {
            return Err("TRITONSERVER_MetricNew returned no metric".into());
        }
        Ok(Metric {
            ptr: metric,
            _family: Arc::clone(&self.0),
        })
    }
}

/// One labelled metric. Keeps its family alive; deleted (before the family) on drop.
#[derive(Debug)]
pub struct Metric {
    ptr: *mut sys::TRITONSERVER_Metric,
    // Dropped after `Metric::drop` has deleted `ptr`.
    _family: Arc<FamilyHandle>,
}

// SAFETY: the header says nothing on thread safety; in the core (src/metric_family.cc)
// Increment/Set/Value go to prometheus-cpp Counter/Gauge, whose values are atomics, and the
// pointer is only invalidated when the family is deleted, which our Arc prevents while a
// Metric exists.
unsafe impl Send for Metric {}
// SAFETY: as above.
unsafe impl Sync for Metric {}

impl Metric {
    /// Adds `value` (a counter rejects negative values).
    pub fn increment(&self, value: f64) -> Result<(), String> {
        // SAFETY: `self.ptr` is a live metric we own.
        unsafe {
            call(
                "TRITONSERVER_MetricIncrement",
                sys::TRITONSERVER_MetricIncrement(self.ptr, value),
            )
        }
    }

}

impl Drop for Metric {
    fn drop(&mut self) {
        // SAFETY: we own the metric and its family is still alive (`_family` is dropped after
        // this body); deleted exactly once.
        if let Err(e) = unsafe {
            call(
                "TRITONSERVER_MetricDelete",
                sys::TRITONSERVER_MetricDelete(self.ptr),
            )
        } {
            log(sys::TRITONSERVER_LOG_ERROR, line!(), &e);
        }
    }
}
