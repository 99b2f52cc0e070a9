//! Label selectors (`matchLabels` AND `matchExpressions` with In, NotIn, Exists,
//! DoesNotExist), as the API server defines them. An empty selector matches everything; what an
//! absent one means depends on where it is absent, so callers decide that.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Whether `selector` selects an object with `labels`. An operator the API does not define
/// selects nothing (the API server would have refused the object).
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let by_label = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    by_label
        && selector.match_expressions.iter().flatten().all(|req| {
            let value = labels.get(&req.key);
            let values = req.values.as_deref().unwrap_or_default();
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Checks what the API server checks of a selector: known operators, values only where the
/// operator takes them.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    for req in selector.match_expressions.iter().flatten() {
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => return Err(format!("matchExpressions {}: {} needs values", req.key, req.operator)),
            "Exists" | "DoesNotExist" if !values.is_empty() => return Err(format!("matchExpressions {}: {} takes no values", req.key, req.operator)),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(format!("matchExpressions {}: unknown operator {other:?}", req.key)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement { key: key.into(), operator: op.into(), values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()) }
    }

    #[test]
    fn empty_selects_all_and_every_operator() {
        let pod = labels(&[("pod", "a"), ("tier", "web")]);
        assert!(matches(&LabelSelector::default(), &pod));
        let sel = |e: Vec<LabelSelectorRequirement>| LabelSelector { match_expressions: Some(e), match_labels: None };
        assert!(matches(&sel(vec![expr("pod", "In", &["a", "b"])]), &pod));
        assert!(!matches(&sel(vec![expr("pod", "NotIn", &["a"])]), &pod));
        assert!(matches(&sel(vec![expr("missing", "NotIn", &["a"])]), &pod), "NotIn selects objects without the key");
        assert!(matches(&sel(vec![expr("tier", "Exists", &[])]), &pod));
        assert!(!matches(&sel(vec![expr("tier", "DoesNotExist", &[])]), &pod));
        // matchLabels and matchExpressions are ANDed.
        let both = LabelSelector { match_labels: Some(labels(&[("pod", "a")])), match_expressions: Some(vec![expr("tier", "In", &["db"])]) };
        assert!(!matches(&both, &pod));
        assert!(validate(&sel(vec![expr("pod", "In", &[])])).is_err());
        assert!(validate(&sel(vec![expr("pod", "Exists", &["x"])])).is_err());
        assert!(validate(&sel(vec![expr("pod", "Near", &[])])).is_err());
    }
}
