//! One `ModelInstanceExecute`: every request gets exactly one response, in order; a request
//! whose inputs are unusable gets an error response and the others are served. With
//! `outbox_sync=full`, responses wait until their flagged items are durable.

use std::borrow::Cow;

use triton_al_step::{Boxes, Embedding, Scores, StepRequest};

use crate::model::ModelState;
use crate::tensors::{self, AssetTensor};
use crate::triton::{log_error, log_warn, now_ns, sys, Instance, Request, Response};

/// What the step needs from one request, borrowed from it where it can be.
struct Parsed<'a> {
    scores: Cow<'a, [f32]>,
    shape: Vec<usize>,
    assets: Option<AssetTensor<'a>>,
    /// Detection boxes (`boxes_input`) and their shape; checked against the scores by the step.
    boxes: Option<(Cow<'a, [f32]>, Vec<usize>)>,
    /// The model's embeddings (`embedding_input`) and their shape; checked by the step.
    embedding: Option<(Cow<'a, [f32]>, Vec<usize>)>,
    model_version: Option<String>,
}

fn parse<'a>(state: &ModelState, request: &'a Request) -> Result<Parsed<'a>, String> {
    let s = &state.step.settings;
    let input = request.input(&s.scores_input)?.ok_or_else(|| format!("missing input '{}'", s.scores_input))?;
    let shape = tensors::sizes(input.name(), &input.shape())?;
    let scores = tensors::scores(&input, &shape)?;
    let assets = match &s.asset_input {
        Some(name) => request.input(name)?.map(|i| AssetTensor::new(&i)).transpose()?,
        None => None,
    };
    let boxes = match &s.boxes_input {
        Some(name) => {
            let input = request.input(name)?.ok_or_else(|| format!("missing input '{name}'"))?;
            let shape = tensors::sizes(input.name(), &input.shape())?;
            Some((tensors::boxes(&input, &shape)?, shape))
        }
        None => None,
    };
    // A missing embedding is the step's to refuse (`Step::process`, as for the Python step).
    let embedding = match &s.embedding_input {
        Some(name) => match request.input(name)? {
            Some(input) => {
                let shape = tensors::sizes(input.name(), &input.shape())?;
                Some((tensors::embedding(&input, &shape)?, shape))
            }
            None => None,
        },
        None => None,
    };
    let mut model_version = None;
    if state.version_input {
        model_version = request.input("MODEL_VERSION")?.and_then(|i| tensors::model_version(&i));
    }
    if model_version.is_none() {
        model_version = state.served_version.as_ref().map(|v| v.get());
    }
    Ok(Parsed { scores, shape, assets, boxes, embedding, model_version })
}

/// The response's outputs: the requested ones of SCORE, FLAGGED and the pass-throughs.
fn respond(state: &ModelState, request: &Request, scores: &[f32], reasons: &[u8]) -> Result<Response, String> {
    let requested = request.requested_output_names()?;
    let wanted = |name: &str| requested.is_empty() || requested.iter().any(|r| r == name);
    let mut response = Response::new(request)?;
    let batch = scores.len() as i64;
    for name in &state.passthrough {
        if !wanted(name) {
            continue;
        }
        let input = request.input(name)?.ok_or_else(|| format!("missing input '{name}' (passed through to the output of that name)"))?;
        let data = input.bytes()?;
        response.output_buffer(name, input.datatype(), &input.shape(), data.len())?.copy_from_slice(&data);
    }
    if wanted("SCORE") {
        let out = response.output_buffer("SCORE", sys::TRITONSERVER_TYPE_FP32, &[batch, 1], scores.len() * 4)?;
        for (chunk, s) in out.chunks_exact_mut(4).zip(scores) {
            chunk.copy_from_slice(&s.to_le_bytes());
        }
    }
    if wanted("FLAGGED") {
        let out = response.output_buffer("FLAGGED", sys::TRITONSERVER_TYPE_BOOL, &[batch, 1], reasons.len())?;
        for (o, &r) in out.iter_mut().zip(reasons) {
            *o = u8::from(r != 0);
        }
    }
    Ok(response)
}

pub fn execute(instance: Instance, state: &ModelState, requests: Vec<Request>) {
    let exec_start = now_ns();
    let parsed: Vec<Result<Parsed<'_>, String>> = requests.iter().map(|r| parse(state, r)).collect();
    let step_requests: Vec<StepRequest<'_>> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|p| StepRequest {
            scores: Scores { values: &p.scores, shape: &p.shape },
            assets: p.assets.as_ref().map(|a| a as &dyn triton_al_step::Assets),
            boxes: p.boxes.as_ref().map(|(values, shape)| Boxes { values, shape }),
            embedding: p.embedding.as_ref().map(|(values, shape)| Embedding { values, shape }),
            model_version: p.model_version.clone(),
        })
        .collect();
    let compute_start = now_ns();
    let processed = state.step.process(&step_requests);
    let mut outbox_errors = processed.report.outbox_errors;
    let invalid_embeddings = processed.report.invalid_embeddings;
    if state.outbox_missing() {
        outbox_errors += processed.report.flagged[1..].iter().sum::<u64>();
    }
    for problem in &processed.report.problems {
        log_warn!("active_learning {}: {problem}", state.name);
    }
    if let Some(ticket) = processed.pending {
        // Durable (or committed, with outbox_sync=normal) before anyone hears it was flagged.
        if let Err(e) = ticket.wait(state.outbox_timeout) {
            outbox_errors += processed.items as u64;
            log_error!("active_learning {}: {} flagged items may not be stored: {e}", state.name, processed.items);
        }
    }
    let compute_end = now_ns();
    let mut results = processed.results.into_iter();
    let mut total_batch = 0u64;
    let mut successes = Vec::with_capacity(requests.len());
    for (request, p) in requests.iter().zip(&parsed) {
        let outcome = match p {
            Err(e) => Err(e.clone()),
            Ok(_) => results.next().unwrap_or_else(|| Err("internal error: no result for this request".into())),
        };
        let sent = match outcome {
            Ok(evaluation) => {
                if let Some(m) = &state.metrics {
                    m.observe(&evaluation.scores, &evaluation.reasons);
                }
                total_batch += evaluation.scores.len() as u64;
                match respond(state, request, &evaluation.scores, &evaluation.reasons) {
                    Ok(response) => response.send(None).map(|_| true),
                    Err(e) => Response::new(request).and_then(|r| r.send(Some(&format!("active_learning: {e}")))).map(|_| false),
                }
            }
            Err(e) => Response::new(request)
                .and_then(|r| r.send_error(sys::TRITONSERVER_ERROR_INVALID_ARG, &format!("active_learning: {e}")))
                .map(|_| false),
        };
        successes.push(sent.unwrap_or_else(|e| {
            log_error!("active_learning {}: could not send a response: {e}", state.name);
            false
        }));
    }
    drop(step_requests);
    drop(parsed);
    let exec_end = now_ns();
    for (request, success) in requests.into_iter().zip(successes) {
        if let Err(e) = instance.report_statistics(&request, success, exec_start, compute_start, compute_end, exec_end) {
            log_error!("active_learning {}: {e}", state.name);
        }
        if let Err(e) = request.release(sys::TRITONSERVER_REQUEST_RELEASE_ALL) {
            log_error!("active_learning {}: {e}", state.name);
        }
    }
    if let Some(m) = &state.metrics {
        if outbox_errors > 0 {
            m.outbox_errors(outbox_errors);
        }
        if invalid_embeddings > 0 {
            m.invalid_embeddings(invalid_embeddings);
        }
    }
    if total_batch > 0 {
        let _ = instance.report_batch_statistics(total_batch, exec_start, compute_start, compute_end, exec_end);
    }
}
