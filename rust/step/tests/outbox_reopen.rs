//! A step whose outbox cannot be opened at load serves without it, and opens it as soon as
//! it can (`Step::open_retrying`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use triton_al_step::{Step, StepSettings};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("triton-al-step-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn settings(outbox: &Path) -> StepSettings {
    let params: BTreeMap<String, String> =
        [("model_name", "m"), ("outbox_path", outbox.to_str().expect("utf-8 path"))].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    StepSettings::from_parameters(&params, None).expect("settings")
}

#[test]
fn an_outbox_unusable_at_load_is_opened_once_it_can_be() {
    let dir = scratch_dir("reopen");
    let path = dir.join("outbox.sqlite");
    std::fs::write(&path, vec![0x5a; 8192]).expect("a file that is not SQLite");
    let (told, heard) = mpsc::channel();
    let step = Step::open_retrying(settings(&path), Duration::from_millis(20), move |event| told.send(event).expect("listener"));
    let first = heard.recv_timeout(Duration::from_secs(5)).expect("the failure is reported at once");
    assert!(matches!(&first, Err(message) if message.contains("outbox.sqlite")), "{first:?}");
    assert!(step.outbox().is_none());
    std::thread::sleep(Duration::from_millis(100));
    assert!(step.outbox().is_none(), "the file is still not an outbox");
    assert!(heard.try_recv().is_err(), "a failure is reported once, not at every attempt");

    std::fs::remove_file(&path).expect("the operator removes the bad file");
    assert_eq!(heard.recv_timeout(Duration::from_secs(5)).expect("reopened"), Ok(()));
    let started = Instant::now();
    while step.outbox().is_none() && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(step.outbox().is_some(), "the reopened outbox is the step's");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_dropped_step_stops_its_thread_at_once_and_never_opens_the_outbox() {
    let dir = scratch_dir("dropped");
    let path = dir.join("outbox.sqlite");
    std::fs::write(&path, vec![0x5a; 8192]).expect("a file that is not SQLite");
    let (told, heard) = mpsc::channel();
    // A long interval: dropping must wake the thread, not wait for its next attempt.
    let step = Step::open_retrying(settings(&path), Duration::from_secs(600), move |event| {
        let _ = told.send(event);
    });
    assert!(heard.recv_timeout(Duration::from_secs(5)).expect("the failure").is_err());
    let dropping = Instant::now();
    drop(step); // joins the thread (a backend library may be unloaded right after)
    assert!(dropping.elapsed() < Duration::from_secs(60), "drop waited {:?} for the retry interval", dropping.elapsed());
    std::fs::remove_file(&path).expect("remove the bad file");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!path.exists(), "nothing reopened the outbox of a step that is gone");
    assert!(heard.try_recv().is_err());
    std::fs::remove_dir_all(&dir).ok();
}
