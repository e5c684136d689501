//! The transport contract (`common/transport_contract.rs`) over the
//! in-memory pipe, loopback TCP and a Unix socket; `ssh/tests/sshd.rs` holds
//! SSH channels to the same cases.

#[path = "common/transport_contract.rs"]
mod contract;

use cosmos_proto::BoxStream;

#[tokio::test]
async fn the_in_memory_pipe_keeps_the_contract() {
    contract::run_all(|| async {
        let (c, a) = tokio::io::duplex(64 * 1024);
        (Box::new(c) as BoxStream, Box::new(a) as BoxStream)
    })
    .await;
}

#[tokio::test]
async fn loopback_tcp_keeps_the_contract() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = std::sync::Arc::new(listener);
    contract::run_all(|| {
        let listener = listener.clone();
        async move {
            let (c, a) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            (Box::new(c.unwrap()) as BoxStream, Box::new(a.unwrap().0) as BoxStream)
        }
    })
    .await;
}

#[tokio::test]
async fn a_unix_socket_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::sync::Arc::new(tokio::net::UnixListener::bind(&path).unwrap());
    contract::run_all(|| {
        let (listener, path) = (listener.clone(), path.clone());
        async move {
            let (c, a) = tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
            (Box::new(c.unwrap()) as BoxStream, Box::new(a.unwrap().0) as BoxStream)
        }
    })
    .await;
}
