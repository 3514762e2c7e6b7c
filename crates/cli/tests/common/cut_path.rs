//! A network path between the gateways that a test can cut: a TCP relay
//! on loopback whose connections are all dropped at once, as a failed link
//! would leave them (the gateways see their TLS streams end without
//! close_notify, and each QEMU its socket close).

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct CutPath {
    /// Where the source gateway connects instead of the target gateway.
    pub addr: String,
    live: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CutPath {
    /// Relays every connection to `target` (HOST:PORT) until [`CutPath::cut`].
    pub async fn to(target: &str) -> CutPath {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let live: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (target, tasks) = (target.to_string(), live.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                tasks.lock().unwrap().push(relay);
            }
        });
        CutPath { addr, live, accept }
    }

    /// Drops every connection relayed so far; returns how many there were.
    /// New connections are relayed again (the path comes back).
    pub fn cut(&self) -> usize {
        let tasks: Vec<_> = self.live.lock().unwrap().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        tasks.len()
    }
}

impl Drop for CutPath {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
