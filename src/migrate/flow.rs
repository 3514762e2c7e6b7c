//! The flow of one migration: prepare both sides, `migrate`, follow the
//! progress, and end with a summary or the one-sentence failure.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::args::{MigrateArgs, Plan};
use super::error::{Cause, ClientDnError};
use super::managed::Managed;
use super::native::Native;
use super::progress::{bytes, Reporter, Snapshot};
use super::signals::{Interrupt, Signals};
use super::summary::{Failure, Summary};
use super::{cause, EXIT_FAILED, EXIT_USAGE};
use crate::creds::{dn, tls};
use crate::error::chain;
use crate::qmp::{MigrationInfo, MigrationParameters, Qmp, QmpError, UNLIMITED_BANDWIDTH};

/// How often `query-migrate` is asked for progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// After `migrate_cancel`, how long QEMU may take to get to `cancelled`
/// (it waits for its migration thread to notice).
pub const CANCEL_WAIT: Duration = Duration::from_secs(15);

enum Side {
    Managed(Box<Managed>),
    Native(Box<Native>),
}

impl Side {
    fn uri(&self) -> String {
        match self {
            Side::Managed(m) => m.uri(),
            Side::Native(n) => n.uri().to_string(),
        }
    }

    fn id(&self) -> Option<String> {
        match self {
            Side::Managed(m) => Some(m.id.clone()),
            Side::Native(_) => None,
        }
    }
}

/// The migration, with its progress on `rep`; the demo calls this too.
pub async fn execute(args: &MigrateArgs, rep: &mut Reporter) -> Result<Summary, Failure> {
    let usage = |sentence: String| Failure {
        sentence,
        exit_code: EXIT_USAGE,
        source_status: None,
        migration_id: None,
    };
    let plan = args.check().map_err(|e| usage(format!("{e}.")))?;
    let mut signals = Signals::new().map_err(|e| usage(format!("cannot handle signals: {e}.")))?;
    let path = &args.source_qmp;
    let mut src = Qmp::connect_unix(path).await.map_err(|e| Failure {
        sentence: format!(
            "migration not started: cannot connect to the source QEMU's QMP socket {}: {}; nothing was changed.",
            path.display(),
            chain(&e)
        ),
        exit_code: EXIT_FAILED,
        source_status: None,
        migration_id: None,
    })?;
    let before = match src.query_status().await {
        Ok(s) => s,
        Err(e) => {
            return Err(Failure {
                sentence: format!(
                    "migration not started: the source QEMU does not answer query-status: {}; nothing was changed.",
                    chain(&e)
                ),
                exit_code: EXIT_FAILED,
                source_status: None,
                migration_id: None,
            })
        }
    };
    let mut m = Migration {
        args,
        plan,
        src,
        before,
        side: None,
    };
    m.go(rep, &mut signals).await
}

struct Migration<'a> {
    args: &'a MigrateArgs,
    plan: Plan<'a>,
    src: Qmp,
    /// The source VM's state when we started.
    before: String,
    side: Option<Side>,
}

impl Migration<'_> {
    async fn go(&mut self, rep: &mut Reporter, signals: &mut Signals) -> Result<Summary, Failure> {
        let prepared = tokio::select! {
            r = self.prepare(rep) => r,
            sig = signals.recv() => Err(Stop::Interrupted(sig)),
        };
        let (uuid, dn) = match prepared {
            Ok(x) => x,
            Err(stop) => return Err(self.not_started(stop).await),
        };
        let uri = self.side.as_ref().expect("prepared").uri();
        rep.step(&format!(
            "source QEMU: migrating to {uri} (return-path on{}{}, {})",
            if uuid.is_some() {
                ", validate-uuid on"
            } else {
                ""
            },
            if self.args.multifd > 0 {
                format!(", multifd {} channels", self.args.multifd)
            } else {
                String::new()
            },
            match self.args.max_bandwidth {
                Some(b) => format!("max {}/s", bytes(b)),
                None => "bandwidth unlimited".into(),
            }
        ));
        let started = Instant::now();
        if let Err(e) = self.src.migrate(&uri).await {
            return Err(self.not_started(Stop::Cause(Cause::SourceQemu(e))).await);
        }

        // Progress until QEMU's verdict or a signal.
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let info = loop {
            tokio::select! {
                _ = tick.tick() => {}
                sig = signals.recv() => return self.interrupted(sig, rep).await,
            }
            let info = match self.src.query_migrate().await {
                Ok(i) => i,
                Err(e) => return Err(self.failed(rep, Some(Cause::SourceQemu(e)), None).await),
            };
            rep.progress(&Snapshot::from_info(&info, started.elapsed()));
            if let Some(Side::Managed(mg)) = &mut self.side {
                // At the end, ask now: a fast migration beats the poll's pace.
                mg.poll_admission(rep, info.is_terminal()).await;
            }
            if info.is_terminal() {
                break info;
            }
        };
        rep.finish_progress();
        match info.status.as_deref() {
            Some("completed") => Ok(self.summary(rep, &info, started.elapsed(), uuid, dn).await),
            _ => Err(self.failed(rep, None, Some(&info)).await),
        }
    }

    /// Everything before `migrate`: the VM, our identity, the target side,
    /// the source's capabilities and parameters.
    async fn prepare(&mut self, rep: &mut Reporter) -> Result<(Option<Uuid>, String), Stop> {
        let q = |e: QmpError| Stop::Cause(Cause::SourceQemu(e));
        let info = self.src.query_migrate().await.map_err(q)?;
        if let Some(status) = info.status.as_deref().filter(|_| !info.is_terminal()) {
            if status != "none" {
                return Err(Stop::Cause(Cause::InProgress {
                    status: status.to_string(),
                }));
            }
        }
        let uuid = Some(self.src.query_uuid().await.map_err(q)?).filter(|u| !u.is_nil());
        let dn = client_dn(&self.args.x509_dir).map_err(|e| Stop::Cause(e.into()))?;
        rep.step(&format!(
            "source QEMU at {}: VM {} is {}; this side authenticates as {dn}",
            self.args.source_qmp.display(),
            uuid.map_or_else(|| "(no -uuid)".to_string(), |u| u.to_string()),
            self.before,
        ));
        if uuid.is_none() {
            let bound = if self.args.native_tls {
                "the target QEMU's tls-authz"
            } else {
                "the one-shot ticket and the peer's DN"
            };
            rep.note(&format!("the VM was started without -uuid: the stream cannot prove which VM it is; it is bound to this migration by {bound} only"));
        }

        self.side = Some(match self.plan {
            Plan::Native { target_qmp } => Side::Native(Box::new(
                Native::prepare(self.args, target_qmp, &mut self.src, &dn, rep)
                    .await
                    .map_err(|e| Stop::Cause(e.into()))?,
            )),
            Plan::Gateway {
                target: api,
                forward,
            } => {
                // Stale native TLS settings would wrap TLS inside the gateway's TLS.
                let off = MigrationParameters {
                    tls_creds: Some(String::new()),
                    ..Default::default()
                };
                self.src.set_parameters(&off).await.map_err(q)?;
                // The QEMU behind the QMP socket is the only process the
                // source gateway will take a stream from.
                let qemu = self
                    .src
                    .peer_cred()
                    .map_err(|e| Stop::Cause(Cause::SourceCred(e)))?;
                Side::Managed(Box::new(
                    Managed::prepare(self.args, api, forward, uuid, &dn, &qemu, rep)
                        .await
                        .map_err(|e| Stop::Cause(e.into()))?,
                ))
            }
        });

        self.src
            .set_capabilities([
                ("return-path", true),
                ("validate-uuid", uuid.is_some()),
                ("multifd", self.args.multifd > 0),
            ])
            .await
            .map_err(q)?;
        let params = MigrationParameters {
            max_bandwidth: Some(self.args.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH)),
            downtime_limit: self.args.downtime_limit,
            multifd_channels: (self.args.multifd > 0).then_some(self.args.multifd),
            ..Default::default()
        };
        self.src.set_parameters(&params).await.map_err(q)?;
        Ok((uuid, dn))
    }

    /// The source VM's state as the end of a sentence.
    async fn vm_clause(&mut self) -> (String, Option<String>) {
        match self.src.query_status().await {
            Ok(now) => (cause::source_vm(&self.before, Ok(&now)), Some(now)),
            Err(e) => (cause::source_vm(&self.before, Err(&chain(&e))), None),
        }
    }

    /// A failure before `migrate` ran: the registration is withdrawn.
    async fn not_started(&mut self, stop: Stop) -> Failure {
        let id = self.side.as_ref().and_then(Side::id);
        if let Some(Side::Managed(m)) = &self.side {
            let _ = m.cancel().await;
        }
        // A `migrate` interrupted while in flight may have started it.
        let _ = self.src.migrate_cancel().await;
        let (vm, now) = self.vm_clause().await;
        let (lead, why, code) = match stop {
            Stop::Cause(c) => ("migration not started", chain(&c), EXIT_FAILED),
            Stop::Interrupted(sig) => (
                "migration not started",
                format!("interrupted by {}", sig.name()),
                sig.exit_code(),
            ),
        };
        Failure {
            sentence: cause::sentence(lead, &why, &vm),
            exit_code: code,
            source_status: now,
            migration_id: id,
        }
    }

    /// QEMU's verdict was not "completed" (or QMP broke): find the cause.
    async fn failed(
        &mut self,
        rep: &mut Reporter,
        known: Option<Cause>,
        info: Option<&MigrationInfo>,
    ) -> Failure {
        rep.finish_progress();
        let source_qemu = info.and_then(|i| i.error_desc.clone());
        let status = info.and_then(|i| i.status.clone());
        let (records, view, target_qemu) = match &mut self.side {
            Some(Side::Managed(m)) => {
                let (r, v) = m.failure_evidence().await;
                (r, v, None)
            }
            Some(Side::Native(n)) => (Vec::new(), None, n.target_error().await),
            None => (Vec::new(), None, None),
        };
        let why = known.map(|c| chain(&c)).unwrap_or_else(|| {
            cause::cause(&cause::Evidence {
                gateway: &records,
                daemon: view.as_ref(),
                target_qemu: target_qemu.as_deref(),
                source_qemu: source_qemu.as_deref(),
            })
        });
        let lead = match status.as_deref() {
            Some("cancelled") => "migration cancelled",
            _ => "migration failed",
        };
        let (vm, now) = self.vm_clause().await;
        Failure {
            sentence: cause::sentence(lead, &why, &vm),
            exit_code: EXIT_FAILED,
            source_status: now,
            migration_id: self.side.as_ref().and_then(Side::id),
        }
    }

    /// SIGINT/SIGTERM while migrating: cancel on both sides, then report.
    async fn interrupted(
        &mut self,
        sig: Interrupt,
        rep: &mut Reporter,
    ) -> Result<Summary, Failure> {
        rep.finish_progress();
        rep.step(&format!(
            "{}: cancelling the migration on both sides",
            sig.name()
        ));
        // The daemon first: a source QEMU that cancels closes its channels
        // cleanly, which the daemon could take for the end of the stream.
        let daemon = match &self.side {
            Some(Side::Managed(m)) => match m.cancel().await {
                Ok(v) => format!(
                    "the target daemon marked migration {} {}, ",
                    v.id,
                    v.state.as_str()
                ),
                Err(e) => format!("the target daemon did not confirm ({}), ", chain(&e)),
            },
            _ => String::new(),
        };
        let source = match self.src.migrate_cancel().await {
            Ok(_) => "the source QEMU cancelled it".to_string(),
            Err(e) => format!("migrate_cancel failed ({})", chain(&e)),
        };
        // Wait for QEMU to get out of the migration before saying where the VM is.
        let deadline = Instant::now() + CANCEL_WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            match self.src.query_migrate().await {
                Ok(i) if i.is_terminal() => {
                    last = i.status;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => break,
            }
        }
        if last.as_deref() == Some("completed") {
            rep.note("the migration completed before it could be cancelled");
        }
        let (vm, now) = self.vm_clause().await;
        let why = format!(
            "interrupted by {}: {daemon}{source}{}",
            sig.name(),
            last.map_or_else(String::new, |s| format!(" (QEMU status {s})"))
        );
        Err(Failure {
            sentence: cause::sentence("migration cancelled", &why, &vm),
            exit_code: sig.exit_code(),
            source_status: now,
            migration_id: self.side.as_ref().and_then(Side::id),
        })
    }

    async fn summary(
        &mut self,
        rep: &mut Reporter,
        info: &MigrationInfo,
        elapsed: Duration,
        uuid: Option<Uuid>,
        dn: String,
    ) -> Summary {
        let ram = info.ram.clone().unwrap_or_default();
        // QEMU 7.2 reports total-time 0 for a guest that is not running.
        let total_ms = match info.total_time {
            Some(t) if t > 0 => t,
            _ => elapsed.as_millis() as u64,
        };
        let throughput = ram.transferred.saturating_mul(8_000) / total_ms.max(1);
        let source_status = self.src.query_status().await.ok();
        let mut s = Summary {
            mode: if self.args.native_tls {
                "native-tls"
            } else {
                "gateway"
            },
            migration_id: None,
            vm_uuid: uuid,
            source_dn: dn,
            admitted_dn: None,
            target_dn: None,
            total_time_ms: total_ms,
            downtime_ms: info.downtime,
            setup_time_ms: info.setup_time,
            bytes: ram.transferred,
            throughput_bps: throughput,
            passes: ram.dirty_sync_count,
            channels: 1 + u32::from(self.args.multifd),
            target_status: None,
            source_status,
        };
        match &mut self.side {
            Some(Side::Managed(m)) => {
                s.migration_id = Some(m.id.clone());
                s.target_dn = m.target_dn();
                if let Some(v) = m.settled_view().await {
                    if v.state != crate::control::types::Phase::Completed {
                        rep.note(&format!(
                            "QEMU reports the migration completed, but the target daemon recorded migration {} as {}{}",
                            v.id,
                            v.state.as_str(),
                            v.reason.as_deref().map_or_else(String::new, |r| format!(": {r}"))
                        ));
                    }
                    s.admitted_dn = v.peer_dn;
                }
            }
            Some(Side::Native(n)) => {
                let want = if self.before == "running" {
                    "running"
                } else {
                    "paused"
                };
                s.target_status = n.target_status(want).await;
            }
            None => {}
        }
        s
    }
}

/// Why a migration stopped before it started.
enum Stop {
    Cause(Cause),
    Interrupted(Interrupt),
}

/// The subject DN of `client-cert.pem`, as QEMU's tls-authz will see it.
pub fn client_dn(x509_dir: &std::path::Path) -> Result<String, ClientDnError> {
    use rustls_pki_types::pem::PemObject;
    let path = x509_dir.join(tls::CLIENT_CERT);
    let cert = match rustls_pki_types::CertificateDer::from_pem_file(&path) {
        Ok(c) => c,
        Err(source) => return Err(ClientDnError::Read { path, source }),
    };
    dn::subject_dn(&cert).map_err(|source| ClientDnError::Dn { path, source })
}
