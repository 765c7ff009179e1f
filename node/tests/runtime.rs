//! The async runtime has the number of workers the `workers` setting asks for, and
//! says so in `keydrop_runtime_workers`.

mod common;

use common::Node;

async fn workers_exported(node: &Node) -> String {
    let text = node.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix("keydrop_runtime_workers "))
        .unwrap_or_else(|| panic!("no keydrop_runtime_workers in:\n{text}"))
        .to_owned()
}

#[tokio::test]
async fn workers_setting_sizes_the_runtime() {
    let one = Node::start(&[("KEYDROP_WORKERS", "1")]).await;
    let three = Node::start(&[("KEYDROP_WORKERS", "3")]).await;
    assert_eq!(workers_exported(&one).await, "1");
    assert_eq!(workers_exported(&three).await, "3");
    let cores = std::thread::available_parallelism().unwrap().get();
    let default = Node::start(&[]).await;
    assert_eq!(workers_exported(&default).await, cores.to_string());
}
