//! The async runtime has the number of workers the `workers` setting asks for, and
//! says so in `keydrop_runtime_workers`.

mod common;

use common::Node;

const WORKERS: &str = "keydrop_runtime_workers";

#[tokio::test]
async fn workers_setting_sizes_the_runtime() {
    let one = Node::start(&[("KEYDROP_WORKERS", "1")]).await;
    let three = Node::start(&[("KEYDROP_WORKERS", "3")]).await;
    assert_eq!(one.metric(WORKERS).await, 1.0);
    assert_eq!(three.metric(WORKERS).await, 3.0);
    let cores = std::thread::available_parallelism().unwrap().get();
    let default = Node::start(&[]).await;
    assert_eq!(default.metric(WORKERS).await, cores as f64);
}
