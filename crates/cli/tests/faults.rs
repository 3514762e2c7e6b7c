//! Faults during a real migration through miggate, one test per
//! (victim, point): SIGKILL of the source gateway, the target gateway, the
//! daemon, the target QEMU and the source QEMU during the handshake /
//! admission, mid-stream and at the switch-over; and the path between the
//! gateways cut (network namespaces joined by a veth pair). After each:
//! the source QEMU's migration failed with a reason and its VM runs on,
//! the target QEMU loaded nothing, the daemon's registration and metrics
//! say failed, every surviving gateway is idle again, and the same
//! migration, retried after restarting what was killed, completes with the
//! RAM and UUID intact. How the points are reached: `common::faults`.

mod common;

use common::faults::{case, Point, Victim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_during_handshake() {
    case(Victim::SourceGateway, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_mid_stream() {
    case(Victim::SourceGateway, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_gateway_killed_at_switchover() {
    case(Victim::SourceGateway, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_during_handshake() {
    case(Victim::TargetGateway, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_mid_stream() {
    case(Victim::TargetGateway, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_gateway_killed_at_switchover() {
    case(Victim::TargetGateway, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_during_handshake() {
    case(Victim::Daemon, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_stream() {
    case(Victim::Daemon, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_at_switchover() {
    case(Victim::Daemon, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_during_handshake() {
    case(Victim::SourceQemu, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_mid_stream() {
    case(Victim::SourceQemu, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_qemu_killed_at_switchover() {
    case(Victim::SourceQemu, Point::Switchover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_during_handshake() {
    case(Victim::TargetQemu, Point::Handshake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_mid_stream() {
    case(Victim::TargetQemu, Point::MidStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_at_switchover() {
    case(Victim::TargetQemu, Point::Switchover).await;
}
/// The path between the gateways cut mid-stream (link down, peer address
/// blackholed: no reset, no ICMP): the stall timeout cuts both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_between_gateways_cut_mid_stream() {
    case(Victim::Path, Point::MidStream).await;
}
