//! `/metrics` is valid Prometheus text (checked by `promtool check metrics`), the
//! alert rules load (`promtool check rules`), and every metric the rules and the
//! Grafana dashboard use is one the node exports.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::{cards, on_sale, repo_root, Node};
use reqwest::StatusCode;

/// Metrics that appear only once their event has happened (labelled, so there is
/// no series to create at 0 in advance).
const AFTER_FIRST_EVENT: &[&str] = &["keydrop_engine_overloaded_total", "keydrop_sku_unavailable"];

fn promtool() -> Command {
    let path = if std::path::Path::new("/usr/bin/promtool").exists() {
        "/usr/bin/promtool"
    } else {
        "promtool"
    };
    Command::new(path)
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("keydrop_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_owned());
        i = end;
    }
    names
}

/// Histogram series names map back to the histogram.
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

#[tokio::test]
async fn metrics_pass_promtool_and_cover_rules_and_dashboard() {
    let node = Node::start(&[]).await;
    // Some traffic, so that labelled series exist.
    node.sku_with_cards("m1", on_sale(100, 1, 600), &cards("m", 2))
        .await;
    let (_, order) = node.reserve("m1", "u1").await;
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(node.pay(id, "p1", 100).await.0, StatusCode::OK);
    assert_eq!(node.reserve("m1", "u2").await.0, StatusCode::CREATED);
    assert_eq!(node.reserve("m1", "u3").await.0, StatusCode::CONFLICT);
    let _ = node.get("/no/such/route").await;
    let wrong_method = node
        .http
        .delete(node.at("/v1/skus/m1/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);

    let text = node.metrics_text().await;
    assert!(text.contains("keydrop_http_request_duration_seconds_bucket{route=\"/v1/skus/{sku}/orders\",le=\"0.005\"}"), "{text}");
    // Each request is counted once, under its route template and status.
    for series in [
        r#"keydrop_http_requests_total{route="/v1/skus/{sku}/orders",status="201"} 2"#,
        r#"keydrop_http_requests_total{route="/v1/skus/{sku}/orders",status="409"} 1"#,
        r#"keydrop_http_requests_total{route="/v1/skus/{sku}/orders",status="405"} 1"#,
        r#"keydrop_http_requests_total{route="/v1/orders/{order_id}/payment",status="200"} 1"#,
        r#"keydrop_http_requests_total{route="unmatched",status="404"} 1"#,
        r#"keydrop_http_request_duration_seconds_count{route="/v1/skus/{sku}/orders"} 4"#,
        r#"keydrop_orders_total{outcome="reserved"} 2"#,
        r#"keydrop_orders_total{outcome="sold_out"} 1"#,
        "keydrop_order_bound_opened_total 0",
        "keydrop_order_bound_floor_raised_total 0",
    ] {
        assert!(
            text.lines().any(|line| line == series),
            "{series} in:\n{text}"
        );
    }
    for histogram in [
        "keydrop_journal_fsync_seconds_bucket",
        "keydrop_journal_answer_wait_seconds_bucket",
    ] {
        assert!(text.contains(histogram), "{histogram} in:\n{text}");
    }
    assert!(
        text.contains("keydrop_sku_cards{sku=\"m1\",state=\"sold\"} 1"),
        "{text}"
    );
    assert!(text.contains("keydrop_orders_shed_total 1"), "{text}");
    assert!(
        !text.contains("secret-m-"),
        "card secrets never reach metrics"
    );

    let mut check = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/install-deps installs it)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let rules = repo_root().join("config/prometheus/alerts.yml");
    let out = promtool()
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let exported: BTreeSet<String> = metric_names(&text)
        .iter()
        .map(|n| base_name(n).to_owned())
        .collect();
    let dashboard =
        std::fs::read_to_string(repo_root().join("config/grafana/keydrop.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let alerts = std::fs::read_to_string(&rules).unwrap();
    for (file, source) in [("alerts.yml", &alerts), ("keydrop.json", &dashboard)] {
        for name in metric_names(source) {
            let name = base_name(&name);
            assert!(
                exported.contains(name) || AFTER_FIRST_EVENT.contains(&name),
                "{file} uses {name}, which the node does not export"
            );
        }
    }
}
