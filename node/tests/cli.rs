//! The operator CLI against a running node, and `keydrop serve` start-up settings.

mod common;

use std::io::Write;
use std::process::Output;

use common::Node;
use reqwest::StatusCode;
use serde_json::Value;

fn run(node: &Node, args: &[&str]) -> Output {
    node.command()
        .arg(args[0])
        .arg(args[1])
        .args(["--url", &node.url])
        .args(&args[2..])
        .output()
        .expect("running keydrop")
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "exit {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn operator_cli_against_a_running_node() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;

    let put = json_of(&run(
        &node,
        &[
            "sku",
            "put",
            "--json",
            "cli-sku",
            "--name",
            "Gift card 10",
            "--price-cents",
            "1000",
            "--per-user-limit",
            "2",
            "--reservation-ttl-secs",
            "300",
            "--low-stock-threshold",
            "10",
            "--starts-at",
            "2020-01-01T00:00:00Z",
        ],
    ));
    assert_eq!(put["sku"], "cli-sku");
    assert_eq!(put["price_cents"], 1000);
    assert_eq!(put["low_stock_threshold"], 10);

    // A CSV bigger than one chunk, with a header line.
    let csv_path = node.dir.path().join("cards.csv");
    let mut csv = std::fs::File::create(&csv_path).unwrap();
    writeln!(csv, "serial,secret").unwrap();
    for i in 0..25_000 {
        writeln!(csv, "G-{i:06},code-{i:06}").unwrap();
    }
    drop(csv);
    let path = csv_path.to_str().unwrap();
    let imported = json_of(&run(
        &node,
        &[
            "sku",
            "import",
            "--json",
            "cli-sku",
            path,
            "--chunk-lines",
            "10000",
        ],
    ));
    assert_eq!(imported["imported"], 25_000, "{imported}");
    assert_eq!(imported["duplicates"], 0);
    assert_eq!(imported["lines"], 25_001);
    // Re-running an import is safe: everything is a duplicate.
    let again = json_of(&run(&node, &["sku", "import", "--json", "cli-sku", path]));
    assert_eq!(
        (again["imported"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(25_000))
    );

    let shown = json_of(&run(&node, &["sku", "show", "--json", "cli-sku"]));
    assert_eq!(shown["available"], 25_000);
    assert_eq!(shown["imported"], 25_000);
    assert_eq!(shown["status"], "on_sale");
    // Human output works too.
    let human = run(&node, &["sku", "show", "cli-sku"]);
    assert!(human.status.success());
    assert!(String::from_utf8_lossy(&human.stdout).contains("available 25000"));

    // Orders: show one, then the refunds list.
    let (status, order) = node.reserve("cli-sku", "buyer-1").await;
    assert_eq!(status, StatusCode::CREATED);
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(node.pay(id, "pay-1", 1000).await.0, StatusCode::OK);
    let shown = json_of(&run(&node, &["order", "show", "--json", id]));
    assert_eq!(shown["status"], "paid");
    let serial = shown["card"]["serial"].as_str().unwrap();
    assert_eq!(
        shown["card"]["secret"].as_str().unwrap(),
        serial.replace("G-", "code-")
    );
    let human = run(&node, &["order", "show", id]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains(serial) && !text.contains(&serial.replace("G-", "code-")),
        "{text}"
    );
    let late = json_of(&run(
        &node,
        &["order", "late", "--json", "--sku", "cli-sku"],
    ));
    assert_eq!(late["refunds"], serde_json::json!([]));

    // A bad line deep in the file is reported with its line number in the file.
    let bad_path = node.dir.path().join("bad.csv");
    let mut bad = std::fs::File::create(&bad_path).unwrap();
    for i in 0..12_344 {
        writeln!(bad, "B-{i},s-{i}").unwrap();
    }
    writeln!(bad, "no-comma-here").unwrap();
    drop(bad);
    let failed = run(
        &node,
        &[
            "sku",
            "import",
            "cli-sku",
            bad_path.to_str().unwrap(),
            "--chunk-lines",
            "5000",
        ],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("line 12345:"), "{stderr}");

    // Errors name the node's error code; a missing token is refused.
    let missing = run(&node, &["sku", "show", "no-such-sku"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("sku_not_found"));
    let wrong_token = run(
        &node,
        &[
            "sku",
            "show",
            "cli-sku",
            "--token",
            "wrong-token-wrong-token",
        ],
    );
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("unauthorized"));
}

#[tokio::test]
async fn serve_refuses_an_unknown_config_field_and_env_wins() {
    let mut node = Node::start(&[]).await;
    let dir = node.dir.path().to_path_buf();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "rate_per_usr = 10\n").unwrap();
    let output = node
        .command()
        .args(["serve", "--config", typo.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rate_per_usr"), "{stderr}");

    // The file says one address; KEYDROP_HTTP_ADDR (port 0 here) wins. The node on
    // this data dir is running, so stop it first.
    assert!(node.sigterm().success());
    let file = dir.join("keydrop.toml");
    let shipped = std::fs::read_to_string(common::repo_root().join("config/keydrop.toml")).unwrap();
    std::fs::write(&file, shipped.replace("127.0.0.1:8080", "127.0.0.1:1")).unwrap();
    let mut child = node
        .command()
        .args(["serve", "--config", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let port: u16 = line
        .trim()
        .strip_prefix("listening on http://127.0.0.1:")
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    assert_ne!(port, 1);
}

#[tokio::test]
async fn a_second_node_on_the_same_data_dir_refuses_to_start() {
    let node = Node::start(&[]).await;
    let output = node
        .command()
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("recovering"), "{stderr}");
    // The first one is unharmed.
    assert_eq!(node.get("/readyz").await.0, StatusCode::OK);
}
