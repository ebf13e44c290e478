//! The engine's non-generating endpoints, answered at once as vLLM shapes
//! them: rerank, score, tokenize and detokenize.

use serde_json::{Value, json};

use crate::api::ApiError;
use crate::config::Config;
use crate::tokens::{output_word, tokenize};

/// The answer to a request to `path` (one of the paths above).
pub fn answer(path: &str, body: &[u8], config: &Config) -> Result<Value, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        message: format!("invalid JSON body: {e}"),
        param: None,
        code: None,
    })?;
    crate::api::check_model(&request, &config.model)?;
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    };
    let id = format!("{:032x}", rand::random::<u128>());
    match path {
        "/tokenize" => {
            let tokens = tokenize(&text(request.get("prompt")));
            Ok(
                json!({"count": tokens.len(), "max_model_len": config.max_model_len, "tokens": tokens}),
            )
        }
        "/detokenize" => {
            let tokens: Vec<u32> = request
                .get("tokens")
                .and_then(Value::as_array)
                .ok_or_else(|| ApiError::bad("tokens", "tokens must be an array of token ids"))?
                .iter()
                .filter_map(|t| t.as_u64().map(|t| t as u32))
                .collect();
            let words: Vec<String> = (0..tokens.len()).map(|i| output_word(&tokens, i)).collect();
            Ok(json!({"prompt": words.concat()}))
        }
        "/v1/score" | "/score" => {
            let left = tokenize(&text(request.get("text_1")));
            let right = tokenize(&text(request.get("text_2")));
            let shared = left.iter().filter(|t| right.contains(t)).count();
            let score = shared as f64 / left.len().max(right.len()).max(1) as f64;
            Ok(
                json!({"id": format!("score-{id}"), "object": "list", "model": config.model,
                "data": [{"index": 0, "object": "score", "score": score}],
                "usage": {"prompt_tokens": left.len() + right.len(), "total_tokens": left.len() + right.len()}}),
            )
        }
        _ => {
            let query = tokenize(&text(request.get("query")));
            let documents = request
                .get("documents")
                .and_then(Value::as_array)
                .ok_or_else(|| ApiError::bad("documents", "documents must be an array"))?;
            let mut total = query.len();
            let mut results: Vec<Value> = documents
                .iter()
                .enumerate()
                .map(|(index, d)| {
                    let words = tokenize(&text(Some(d)));
                    total += words.len();
                    let shared = words.iter().filter(|t| query.contains(t)).count();
                    let score = shared as f64 / words.len().max(1) as f64;
                    json!({"index": index, "relevance_score": score, "document": {"text": text(Some(d))}})
                })
                .collect();
            results.sort_by(|a, b| {
                b["relevance_score"]
                    .as_f64()
                    .partial_cmp(&a["relevance_score"].as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            Ok(
                json!({"id": format!("rerank-{id}"), "model": config.model, "usage": {"total_tokens": total}, "results": results}),
            )
        }
    }
}
