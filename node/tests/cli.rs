//! The operator CLI against a running node, and `keydrop serve` start-up settings.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{assert_error, cards, on_sale, retry_after_secs, Node};
use reqwest::{Method, StatusCode};
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
    // And what went in before the chunk that held it, on the same line.
    assert!(
        stderr.contains("; 10000 cards imported and 0 duplicates skipped before line 10001"),
        "{stderr}"
    );

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

/// The secrets a node generates when none is set, by file name.
const DEV_SECRET_FILES: [&str; 3] = ["admin-token", "payment-secret", "master.key"];

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Without an admin token, payment secret or master key in its settings, a node
/// generates each once, says so in its log, keeps it readable by its owner alone and
/// outside the RocksDB folder (a copy of the database must not carry its keys), and
/// reads the same ones back at the next start without generating anything.
#[tokio::test]
async fn dev_secrets_are_generated_once_private_and_apart_from_the_database() {
    let mut node = Node::start(&[]).await;
    let log = node.log();
    for name in DEV_SECRET_FILES {
        assert!(
            log.lines().any(|line| line.contains("WARN")
                && line.contains(&format!("generated a development {name}"))),
            "no warning that {name} was generated; log:\n{log}"
        );
    }
    let secrets_dir = node.secrets_dir();
    assert_eq!(mode_of(&secrets_dir), 0o700, "{}", secrets_dir.display());
    let generated: Vec<Vec<u8>> = DEV_SECRET_FILES
        .iter()
        .map(|name| {
            let path = secrets_dir.join(name);
            assert_eq!(mode_of(&path), 0o600, "{name}");
            std::fs::read(&path).expect("secret file")
        })
        .collect();
    let texts: Vec<String> = generated
        .iter()
        .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
        .collect();
    for (name, text) in DEV_SECRET_FILES.iter().zip(&texts) {
        assert!(text.len() >= 16, "{name} holds {text:?}");
        assert!(!log.contains(text.as_str()), "{name} is in the log:\n{log}");
    }

    let db = node.data_dir().join("db");
    assert!(db.is_dir(), "no RocksDB folder at {}", db.display());
    for file in files_under(&db) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !DEV_SECRET_FILES.contains(&name.as_str()),
            "{} is inside the RocksDB folder",
            file.display()
        );
        let bytes = std::fs::read(&file).unwrap_or_default();
        for (secret, text) in DEV_SECRET_FILES.iter().zip(&texts) {
            assert!(
                !bytes.windows(text.len()).any(|w| w == text.as_bytes()),
                "{secret} is written in {}",
                file.display()
            );
        }
    }

    let token = texts[0].clone();
    let define = |node: &Node, sku: &str| {
        node.http
            .put(node.at(&format!("/v1/skus/{sku}")))
            .bearer_auth(&token)
            .json(&on_sale(100, 1, 60))
    };
    let (status, body) = node.send(define(&node, "before-restart")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let logged_before_restart = node.log().len();
    node.restart().await;
    for (name, before) in DEV_SECRET_FILES.iter().zip(&generated) {
        let after = std::fs::read(secrets_dir.join(name)).expect("secret file");
        assert!(&after == before, "{name} changed across a restart");
        assert_eq!(mode_of(&secrets_dir.join(name)), 0o600, "{name}");
    }
    let log = node.log();
    let since_restart = &log[logged_before_restart..];
    assert!(
        !since_restart.contains("generated a development"),
        "a secret was generated again; log since the restart:\n{since_restart}"
    );
    let (status, body) = node.send(define(&node, "after-restart")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = node
        .send(
            node.http
                .get(node.at("/v1/admin/skus/before-restart"))
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A rate in the file given with `--config` is the one the node applies: with one
/// order a second and a burst of one per user, a buyer's second order right after
/// the first is 429 with Retry-After. The setting's env var wins over the file: with
/// `KEYDROP_BURST_PER_USER=3`, three orders in a row all go through.
#[tokio::test]
async fn a_rate_from_the_config_file_applies_and_its_env_var_wins() {
    let config_dir = tempfile::tempdir().expect("temp dir");
    let file = config_dir.path().join("keydrop.toml");
    std::fs::write(&file, "rate_per_user = 1\nburst_per_user = 1\n").unwrap();
    let mut node = Node::start_with_args(
        &[("KEYDROP_RATE_PER_IP", "0")],
        &["--config", file.to_str().unwrap()],
    )
    .await;
    node.sku_with_cards("cfg", on_sale(100, 5, 600), &cards("f", 10))
        .await;
    let started = std::time::Instant::now();
    let (first, _) = node.reserve_with_headers("cfg", "alice").await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    let second = node.reserve_with_headers("cfg", "alice").await;
    // A token comes back a second after the first order: only a machine too slow
    // to send two requests in that time would see the second admitted.
    if started.elapsed() < Duration::from_millis(900) {
        assert_error(&second.0, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let retry_after = retry_after_secs(&second);
        assert!((1..=2).contains(&retry_after), "{retry_after}");
    }
    let alice_orders = if second.0 .0 == StatusCode::CREATED {
        2
    } else {
        1
    };

    node.set_env("KEYDROP_BURST_PER_USER", "3");
    let logged_before_restart = node.log().len();
    node.restart().await;
    let log = node.log();
    let effective = log[logged_before_restart..]
        .lines()
        .find(|line| line.contains("effective configuration"))
        .unwrap_or_else(|| panic!("no effective configuration logged:\n{log}"));
    assert!(
        effective.contains(r#""rate_per_user":1,"burst_per_user":3"#),
        "{effective}"
    );
    for n in 1..=3 {
        let (answer, _) = node.reserve_with_headers("cfg", "bob").await;
        assert_eq!(answer.0, StatusCode::CREATED, "order {n}: {}", answer.1);
    }
    let (status, view) = node
        .send(node.admin(Method::GET, "/v1/admin/skus/cfg"))
        .await;
    assert_eq!(
        (status, view["reserved"].as_u64()),
        (StatusCode::OK, Some(alice_orders + 3)),
        "{view}"
    );
}

/// A CSV file as spreadsheets write it, quoted fields and doubled quotes, imported
/// by the CLI: buyers get each secret as written, without the quotes.
#[tokio::test]
async fn import_takes_quoted_fields_and_buyers_get_the_secret_as_written() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.put_sku("quoted", on_sale(100, 1, 60)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cards.csv");
    std::fs::write(
        &path,
        "\"serial\",\"secret\"\r\n\"Q-1\",\"AB,CD\"\r\nQ-2,\"say \"\"hi\"\"\"\r\n",
    )
    .unwrap();
    let imported = json_of(&run(
        &node,
        &["sku", "import", "--json", "quoted", path.to_str().unwrap()],
    ));
    assert_eq!(imported["imported"], 2, "{imported}");
    let mut secrets = Vec::new();
    for buyer in ["b-1", "b-2"] {
        let (status, order) = node.reserve("quoted", buyer).await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        let id = order["order_id"].as_str().unwrap();
        let (status, paid) = node.pay(id, &format!("pay-{buyer}"), 100).await;
        assert_eq!(status, StatusCode::OK, "{paid}");
        let (status, order) = node.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{order}");
        secrets.push(order["card"]["secret"].as_str().unwrap().to_owned());
    }
    secrets.sort();
    assert_eq!(secrets, ["AB,CD", "say \"hi\""]);
}

/// A line longer than the node takes stops the import at that line, named, with
/// what came before it imported and said so; the file is not read whole to find
/// the end of a line that has none.
#[tokio::test]
async fn import_stops_at_a_line_too_long_and_says_what_was_imported() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.put_sku("long-line", on_sale(100, 1, 60)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cards.csv");
    let mut text = String::from("L-1,a\nL-2,b\n");
    text.push_str(&"x".repeat(1 << 20));
    std::fs::write(&path, text).unwrap();
    let output = run(
        &node,
        &[
            "sku",
            "import",
            "long-line",
            path.to_str().unwrap(),
            "--chunk-lines",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 3: longer than 4096 bytes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 cards imported and 0 duplicates skipped before line 3"),
        "{stderr}"
    );
    assert_eq!(node.stock("long-line").await.0, 2);
}

/// Answers each connection to it in turn with the next of `answers` (then closes
/// it), and returns the request heads it was sent.
fn canned_node(answers: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for answer in answers {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            heads.push(head);
            (&stream).write_all(answer.as_bytes()).unwrap();
        }
        heads
    });
    (url, served)
}

fn keydrop_against(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keydrop"))
        .args(&args[..2])
        .args(["--url", url, "--token", "t0k"])
        .args(&args[2..])
        .output()
        .expect("running keydrop")
}

/// A 200 that is not the node's JSON (a proxy's page at --url) is a failure, said
/// as such, not an import of nothing.
#[test]
fn an_answer_that_is_not_json_fails_the_command() {
    let page = "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cards.csv");
    std::fs::write(&path, "P-1,a\n").unwrap();
    let (url, served) = canned_node(vec![page, page]);
    for args in [
        &["sku", "show", "some-sku"][..],
        &["sku", "import", "some-sku", path.to_str().unwrap()],
    ] {
        let output = keydrop_against(&url, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("is not JSON"), "{args:?}: {stderr}");
    }
    assert_eq!(served.join().unwrap().len(), 2);
}

/// A chunk the node refuses for now (503 with Retry-After, 429) is sent again after
/// the wait it names, and the import goes on; a refusal that is not for now stops it.
#[test]
fn an_import_chunk_refused_for_now_is_sent_again() {
    let overloaded = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: 52\r\nconnection: close\r\n\r\n{\"error\":\"overloaded\",\"message\":\"the node is busy\"}\n";
    let throttled = "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: 51\r\nconnection: close\r\n\r\n{\"error\":\"rate_limited\",\"message\":\"per ip; later\"}\n";
    let took = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 30\r\nconnection: close\r\n\r\n{\"imported\":2,\"duplicates\":0}\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cards.csv");
    std::fs::write(&path, "R-1,a\nR-2,b\n").unwrap();
    let (url, served) = canned_node(vec![overloaded, throttled, took]);
    let started = std::time::Instant::now();
    let output = keydrop_against(
        &url,
        &["sku", "import", "retried", path.to_str().unwrap(), "--json"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["imported"], 2, "{summary}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "waited as told"
    );
    assert_eq!(served.join().unwrap().len(), 3);

    let refused = "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 49\r\nconnection: close\r\n\r\n{\"error\":\"sku_not_found\",\"message\":\"no such SKU\"}";
    let (url, served) = canned_node(vec![refused]);
    let output = keydrop_against(&url, &["sku", "import", "retried", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("404 sku_not_found"), "{stderr}");
    assert_eq!(served.join().unwrap().len(), 1);
}

/// An operator command piped into a reader that stops early (`| head -1`) ends
/// quietly, killed by SIGPIPE like other tools, not with a panic.
#[tokio::test]
async fn a_command_whose_reader_goes_away_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.put_sku("piped", on_sale(100, 1, 60)).await;
    let mut child = node
        .command()
        .args(["sku", "show", "--url", &node.url, "--json", "piped"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running keydrop");
    // The reader closes before the answer is printed.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
