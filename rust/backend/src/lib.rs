//! The `active_learning` step as a native Triton backend: `libtriton_active_learning.so`,
//! loaded by tritonserver in its own process for models with `backend: "active_learning"`.
//!
//! The same step as the Python-backend model (`triton_al.serving.active_learning`), over the
//! same Rust core (`triton-al-step`): same parameters and messages, inputs, outputs
//! (pass-throughs, `SCORE`, `FLAGGED`), reasons and metrics; but no process hop per request,
//! and one outbox writer thread for every instance of a model (instances are threads here).
//!
//! Triton calls the entry points below; each catches panics, so none crosses into the server.

mod execute;
mod metrics;
mod model;
mod tensors;
mod triton;

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::model::ModelState;
use crate::triton::{api_compatible, api_version, log_error, log_info, new_error, sys, Backend, Error, Instance, Model, Request, API_MAJOR, API_MINOR};

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into())
}

/// Run an entry point's body: Err and panics become a Triton error (null is success).
fn guarded(what: &str, body: impl FnOnce() -> Result<(), String>) -> Error {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(message)) => new_error(sys::TRITONSERVER_ERROR_INVALID_ARG, &message),
        Err(panic) => new_error(sys::TRITONSERVER_ERROR_INTERNAL, &format!("active_learning: internal error in {what} (please report): {}", panic_text(&*panic))),
    }
}

/// Refuse to load on a server whose backend API this backend was not written for.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_Initialize(backend: *mut sys::TRITONBACKEND_Backend) -> Error {
    guarded("TRITONBACKEND_Initialize", || {
        // SAFETY: Triton passes a live backend to this entry point.
        let name = unsafe { Backend::from_raw(backend) }.name().unwrap_or_default();
        let server = api_version()?;
        if !api_compatible(server) {
            return Err(format!(
                "backend '{name}': written for Triton backend API {API_MAJOR}.{API_MINOR} (tritonserver 2.51 or later in the 2.x \
                 line), but this server offers {}.{}: use a server with API {API_MAJOR}.{API_MINOR} or later, or the Python step \
                 (triton-al attach --step python)",
                server.0, server.1
            ));
        }
        log_info!("active_learning backend loaded (server backend API {}.{}, built for {API_MAJOR}.{API_MINOR})", server.0, server.1);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInitialize(model: *mut sys::TRITONBACKEND_Model) -> Error {
    guarded("TRITONBACKEND_ModelInitialize", || {
        // SAFETY: Triton passes a live model to this entry point.
        let model = unsafe { Model::from_raw(model) };
        let name = model.name()?;
        let state = ModelState::new(&name, &model.config_json()?, model.server()?, &model.repository_path()?)?;
        let s = &state.step.settings;
        log_info!(
            "active_learning {name} ready (native): strategy={} threshold={} groups={:?} task={} outbox={}",
            s.strategy_name,
            s.threshold,
            s.upload_groups,
            s.task.name(),
            s.outbox.as_ref().map_or("none", |o| o.path.as_str())
        );
        let raw = Box::into_raw(Box::new(state));
        // SAFETY: the state is ours until ModelFinalize turns it back into a Box.
        unsafe { model.set_state(raw.cast()) }.inspect_err(|_| {
            // SAFETY: Triton did not take the pointer: reclaim it.
            drop(unsafe { Box::from_raw(raw) });
        })
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelFinalize(model: *mut sys::TRITONBACKEND_Model) -> Error {
    guarded("TRITONBACKEND_ModelFinalize", || {
        // SAFETY: Triton passes a live model to this entry point.
        let model = unsafe { Model::from_raw(model) };
        let state = model.state()?.cast::<ModelState>();
        if !state.is_null() {
            // SAFETY: clearing the pointer we set; the state is freed right after.
            unsafe { model.set_state(std::ptr::null_mut()) }?;
            // SAFETY: the pointer came from Box::into_raw in ModelInitialize; every instance has
            // been finalized, so nothing else uses it. Dropping it drains and closes the outbox.
            drop(unsafe { Box::from_raw(state) });
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceInitialize(instance: *mut sys::TRITONBACKEND_ModelInstance) -> Error {
    guarded("TRITONBACKEND_ModelInstanceInitialize", || {
        // SAFETY: Triton passes a live instance to this entry point.
        let instance = unsafe { Instance::from_raw(instance) };
        if instance.kind()? == sys::TRITONSERVER_INSTANCEGROUPKIND_GPU {
            log_info!("active_learning {}: a GPU instance scores on the CPU (inputs are read from CPU memory)", instance.name()?);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> Error {
    // From here on the requests are ours: this function always returns success and answers
    // (and releases) each request itself, so that one bad request fails alone.
    // SAFETY: Triton passes `request_count` live requests, owned by us since we return success.
    let owned = unsafe { Request::from_raw_array(requests, request_count) };
    // SAFETY: Triton passes a live instance; its model's state was set in ModelInitialize and
    // lives until ModelFinalize, after every instance is finalized.
    let instance = unsafe { Instance::from_raw(instance) };
    let state = match instance.model().and_then(|m| m.state()) {
        Ok(state) if !state.is_null() => state.cast::<ModelState>(),
        other => {
            let why = other.err().unwrap_or_else(|| "the model has no state (not initialized)".into());
            for request in owned {
                triton::send_error_response(&request, &format!("active_learning: {why}"));
                let _ = request.release(sys::TRITONSERVER_REQUEST_RELEASE_ALL);
            }
            return std::ptr::null_mut();
        }
    };
    // SAFETY: see above; the instances' threads share it read-only (its mutable parts are
    // behind locks and atomics).
    let state = unsafe { &*state };
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| execute::execute(instance, state, owned))) {
        // Requests not yet answered cannot be recovered here; the log says why.
        log_error!("active_learning: internal error while executing (please report): {}", panic_text(&*panic));
    }
    std::ptr::null_mut()
}
