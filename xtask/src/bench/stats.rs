//! Medians and ranges over rounds.

use serde_json::{Map, Value, json};

/// Median of `v` (mean of the middle two for an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

/// `{median, min, max, n}` of the finite values.
pub fn spread(v: &[f64]) -> Value {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    match median(&v) {
        None => Value::Null,
        Some(m) => json!({
            "median": m,
            "min": v.iter().copied().fold(f64::INFINITY, f64::min),
            "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "n": v.len(),
        }),
    }
}

/// Groups runs (`{case, mode, metrics: {name: number}}`) by (case, mode), in the order
/// they first appear, into `{case, mode, rounds, metrics: {name: spread}}`.
pub fn summarize(runs: &[Value]) -> Vec<Value> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in runs {
        let k = (r["case"].as_str().unwrap_or("").to_string(), r["mode"].as_str().unwrap_or("").to_string());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(case, mode)| {
            let mine: Vec<&Value> = runs.iter().filter(|r| r["case"] == case.as_str() && r["mode"] == mode.as_str()).collect();
            let mut names: Vec<String> = Vec::new();
            for r in &mine {
                for k in r["metrics"].as_object().into_iter().flat_map(|m| m.keys()) {
                    if !names.contains(k) {
                        names.push(k.clone());
                    }
                }
            }
            let mut metrics = Map::new();
            for n in names {
                let vals: Vec<f64> = mine.iter().filter_map(|r| r["metrics"][&n].as_f64()).collect();
                metrics.insert(n, spread(&vals));
            }
            json!({"case": case, "mode": mode, "rounds": mine.len(), "metrics": metrics})
        })
        .collect()
}

/// The median of `metric` for (case, mode) in a summary.
pub fn med(summary: &Value, case: &str, mode: &str, metric: &str) -> Option<f64> {
    summary
        .as_array()?
        .iter()
        .find(|s| s["case"] == case && s["mode"] == mode)
        .and_then(|s| s["metrics"][metric]["median"].as_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let s = spread(&[5.0, 1.0, f64::NAN, 3.0]);
        assert_eq!(s["median"], 3.0);
        assert_eq!((s["min"].as_f64(), s["max"].as_f64(), s["n"].as_u64()), (Some(1.0), Some(5.0), Some(3)));
    }

    #[test]
    fn summarize_groups_by_case_and_mode_in_order() {
        let runs = vec![
            json!({"case": "c1", "mode": "direct", "metrics": {"rate": 10.0}}),
            json!({"case": "c1", "mode": "sidecap", "metrics": {"rate": 8.0}}),
            json!({"case": "c1", "mode": "direct", "metrics": {"rate": 12.0}}),
        ];
        let s = summarize(&runs);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["mode"], "direct");
        assert_eq!(s[0]["metrics"]["rate"]["median"], 11.0);
        assert_eq!(med(&Value::Array(s), "c1", "sidecap", "rate"), Some(8.0));
    }
}
