//! The shared parameter cases (tests/step_parameter_cases.json): the Python step must give
//! the same results (tests/test_step.py runs the same file).

use std::collections::BTreeMap;

use serde_json::Value as Json;
use triton_al_step::{parse_parameters, Value};

const CASES: &str = include_str!("../../../tests/step_parameter_cases.json");

fn as_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Number(n) => Json::from(*n),
        Value::Text(s) => Json::from(s.as_str()),
        Value::Groups(g) => Json::from(g.clone()),
    }
}

#[test]
fn every_shared_case() {
    let file: Json = serde_json::from_str(CASES).unwrap();
    let base = file["base"].as_object().unwrap();
    let cases = file["cases"].as_array().unwrap();
    assert!(cases.len() > 20);
    for case in cases {
        let mut params: BTreeMap<String, String> = base.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        for (k, v) in case["params"].as_object().unwrap() {
            match v.as_str() {
                Some(text) => params.insert(k.clone(), text.to_string()),
                None => params.remove(k), // null: the parameter is absent
            };
        }
        let env = case.get("env").and_then(Json::as_str);
        let result = parse_parameters(&params, env);
        if let Some(message) = case.get("error") {
            assert_eq!(result.as_ref().err().map(String::as_str), message.as_str(), "case {case}");
        } else {
            let parsed = result.unwrap_or_else(|e| panic!("case {case}: {e}"));
            for (k, expected) in case["parsed"].as_object().unwrap() {
                let got = parsed.get(k).map(as_json).unwrap_or(Json::Null);
                assert_eq!(&got, expected, "case {case}: {k}");
            }
        }
    }
}

#[test]
fn the_table_names_every_parameter_of_the_python_step() {
    let table: Json = serde_json::from_str(triton_al_step::PARAMETERS_JSON).unwrap();
    for key in ["strategy", "threshold", "upload_groups", "outbox_path", "outbox_sync", "outbox_max_asset_bytes", "model_name"] {
        assert!(table["parameters"].get(key).is_some(), "{key} missing from parameters.json");
    }
}
