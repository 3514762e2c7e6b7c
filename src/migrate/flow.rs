//! The flow of one migration: prepare both sides, `migrate`, follow the
//! progress, and end with a summary or the one-sentence failure.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::args::{MigrateArgs, Plan, TargetForward};
use super::error::{Cause, ClientDnError};
use super::managed::{Managed, Vm};
use super::native::Native;
use super::progress::{bytes, Reporter, Snapshot};
use super::signals::{Interrupt, Signals};
use super::storage::{self, StorageError};
use super::summary::{Failure, PostcopySummary, Summary};
use super::{cause, EXIT_FAILED, EXIT_USAGE};
use crate::creds::keyfile::{read_private, KeyFileError};
use crate::creds::{dn, tls};
use crate::error::chain;
use crate::qmp::capabilities::{
    self, MULTIFD, PAUSE_BEFORE_SWITCHOVER, POSTCOPY_PREEMPT, POSTCOPY_RAM,
};
use crate::qmp::{MigrationInfo, MigrationParameters, Qmp, QmpError, UNLIMITED_BANDWIDTH};

/// How often `query-migrate` is asked for progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// After `migrate_cancel`, how long QEMU may take to get to `cancelled`
/// (it waits for its migration thread to notice).
pub const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// How long a resumed postcopy migration may stay `postcopy-paused` after
/// `migrate` with `resume` (QEMU connects, then leaves that state) before
/// the resume counts as failed.
pub const RESUME_START: Duration = Duration::from_secs(30);

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
    unprotected_key(args, &plan).map_err(|e| Failure {
        sentence: format!("migration not started: {e}; nothing was changed."),
        exit_code: EXIT_FAILED,
        source_status: None,
        migration_id: None,
    })?;
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
        postcopy: Postcopy::default(),
        disks: Vec::new(),
        storage_done: None,
    };
    m.go(rep, &mut signals).await
}

/// A client key this command would load (the source gateway's, the
/// https API's) that other users may access fails it before the source
/// QEMU is touched. Other read errors are reported where the key is loaded.
fn unprotected_key(args: &MigrateArgs, plan: &Plan) -> Result<(), KeyFileError> {
    let target = match plan {
        Plan::Gateway { target, .. } | Plan::Recover { target, .. } => target,
        // QEMU reads the keys itself.
        Plan::Native { .. } => return Ok(()),
    };
    let api_dir = args
        .api_x509_dir
        .as_deref()
        .filter(|_| target.starts_with("https://"));
    for dir in std::iter::once(args.x509_dir.as_path()).chain(api_dir) {
        match read_private(&dir.join(tls::CLIENT_KEY)) {
            Err(KeyFileError::Read { .. }) | Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Migration<'a> {
    args: &'a MigrateArgs,
    plan: Plan<'a>,
    src: Qmp,
    /// The source VM's state when we started.
    before: String,
    side: Option<Side>,
    postcopy: Postcopy,
    /// --copy-storage: the disks (block nodes) mirrored to the target.
    disks: Vec<String>,
    /// Their copies were completed at `pre-switchover`, or why not.
    storage_done: Option<Result<(), String>>,
}

/// Where a `--postcopy` migration stands.
#[derive(Debug, Default)]
struct Postcopy {
    /// Passes precopy had completed when we asked for the switch. Set
    /// before `migrate-start-postcopy` is sent: from then on the source
    /// may be in postcopy, where `migrate_cancel` is refused (newer QEMU)
    /// or, worse, accepted: 7.2 then ends its side (`cancelled`), and the
    /// target, left postcopy-paused, can never fetch its missing pages.
    asked_after: Option<u64>,
    /// QEMU refused the switch; precopy goes on.
    refused: bool,
    /// A `postcopy-*` status was seen (or postcopy bytes counted).
    entered: bool,
    /// Signals received since the switch: the first is only reported.
    signals: u32,
    /// The signal whose `migrate-pause` we sent.
    paused_by: Option<Interrupt>,
}

impl Postcopy {
    /// From here the source cannot take the VM back: no migrate_cancel.
    fn started(&self) -> bool {
        self.asked_after.is_some() || self.entered
    }
}

impl Migration<'_> {
    async fn go(&mut self, rep: &mut Reporter, signals: &mut Signals) -> Result<Summary, Failure> {
        let prepared = tokio::select! {
            r = self.prepare_any(rep) => r,
            sig = signals.recv() => Err(Stop::Interrupted(sig)),
        };
        let (uuid, dn) = match prepared {
            Ok(x) => x,
            Err(stop) => return Err(self.not_started(stop).await),
        };
        let uri = self.side.as_ref().expect("prepared").uri();
        if !self.disks.is_empty() {
            let copied = tokio::select! {
                r = self.copy_disks(rep) => r.map_err(Stop::Cause),
                sig = signals.recv() => Err(Stop::Interrupted(sig)),
            };
            if let Err(stop) = copied {
                storage::abandon(&mut self.src, &self.disks).await;
                return Err(self.not_started(stop).await);
            }
        }
        let started = Instant::now();
        if self.recovering() {
            rep.step(&format!(
                "source QEMU: resuming the postcopy migration to {uri} (migrate with resume)"
            ));
            if let Err(e) = self.src.migrate_resume(&uri).await {
                return Err(self.not_started(Stop::Cause(Cause::SourceQemu(e))).await);
            }
        } else {
            rep.step(&format!(
                "source QEMU: migrating to {uri} (return-path on{}{}{}, {})",
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
                match (self.args.postcopy, self.args.postcopy_preempt) {
                    (false, _) => String::new(),
                    (true, preempt) => format!(
                        ", postcopy-ram{} on: postcopy after {} pass{} without converging",
                        if preempt { " and postcopy-preempt" } else { "" },
                        self.args.postcopy_after_passes,
                        if self.args.postcopy_after_passes == 1 {
                            ""
                        } else {
                            "es"
                        }
                    ),
                },
                match self.args.max_bandwidth {
                    // QEMU's max-postcopy-bandwidth (0, unlimited) rules after the switch.
                    Some(b) if self.args.postcopy => format!("max {}/s in precopy", bytes(b)),
                    Some(b) => format!("max {}/s", bytes(b)),
                    None => "bandwidth unlimited".into(),
                }
            ));
            if let Err(e) = self.src.migrate(&uri).await {
                return Err(self.not_started(Stop::Cause(Cause::SourceQemu(e))).await);
            }
        }

        // Progress until QEMU's verdict or a signal.
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut resumed = false;
        let info = loop {
            tokio::select! {
                _ = tick.tick() => {}
                sig = signals.recv() => {
                    if !self.postcopy.started() {
                        return self.interrupted(sig, rep).await;
                    }
                    self.signal_in_postcopy(sig, rep).await;
                    continue;
                }
            }
            let info = match self.src.query_migrate().await {
                Ok(i) => i,
                Err(e) => return Err(self.failed(rep, Some(Cause::SourceQemu(e)), None).await),
            };
            let snap = Snapshot::from_info(&info, started.elapsed());
            rep.progress(&snap);
            if let Some(Side::Managed(mg)) = &mut self.side {
                // At the end, ask now: a fast migration beats the poll's pace.
                mg.poll_admission(rep, info.is_terminal()).await;
            }
            if info.in_postcopy() && !self.postcopy.entered {
                self.postcopy.entered = true;
                if info.status.as_deref() == Some("postcopy-active") {
                    rep.step("postcopy-active: the guest runs on the target now; the source sends the rest of its memory and the pages the target asks for");
                }
            }
            // postcopy-paused waits for a recovery this command does not
            // start: for it, the migration has stopped here. A resume is
            // still paused until QEMU has connected (the command returns
            // first): it has stopped only once it left that state, or if
            // it never does.
            if info.status.as_deref() == Some("pre-switchover") && self.storage_done.is_none() {
                self.complete_disks(rep).await;
                continue;
            }
            let paused = info.status.as_deref() == Some("postcopy-paused");
            resumed |= !paused;
            let stopped =
                paused && (!self.recovering() || resumed || started.elapsed() > RESUME_START);
            if info.is_terminal() || stopped {
                break info;
            }
            if self.args.postcopy
                && !self.postcopy.started()
                && !self.postcopy.refused
                && info.status.as_deref() == Some("active")
                && snap.pass > self.args.postcopy_after_passes
            {
                self.start_postcopy(rep, &snap).await;
            }
        };
        rep.finish_progress();
        match info.status.as_deref() {
            // pause-before-switchover makes every copy pass there; a
            // QEMU that skipped it would leave the mirrors writing through
            // a handed-over image: stop them, and say the disks are not whole.
            Some("completed") if !self.disks.is_empty() && self.storage_done.is_none() => {
                storage::abandon(&mut self.src, &self.disks).await;
                let why = "the RAM migration completed without stopping at pre-switchover, so the disk copies could not be completed: the target's disks are not whole; do not run the guest there".to_string();
                let known = Cause::Storage(StorageError::Mirror {
                    node: self.disks.join(", "),
                    why,
                });
                Err(self.failed(rep, Some(known), Some(&info)).await)
            }
            Some("completed") => {
                let info = self.final_figures(info).await;
                Ok(self.summary(rep, &info, started.elapsed(), uuid, dn).await)
            }
            _ => {
                let known = self
                    .postcopy
                    .paused_by
                    .map(|sig| Cause::PausedBySignal { signal: sig.name() })
                    .or_else(|| match &self.storage_done {
                        Some(Err(why)) => Some(Cause::Storage(StorageError::Mirror {
                            node: self.disks.join(", "),
                            why: why.clone(),
                        })),
                        _ => None,
                    });
                let mut f = self.failed(rep, known, Some(&info)).await;
                if let Some(sig) = self.postcopy.paused_by {
                    f.exit_code = sig.exit_code();
                }
                Err(f)
            }
        }
    }

    /// --copy-storage, before `migrate`: every disk mirrored into the
    /// target until ready. A mirror that fails says why in the gateway's
    /// words when it has them (QEMU's only name the NBD option refused).
    async fn copy_disks(&mut self, rep: &mut Reporter) -> Result<(), Cause> {
        let Some(Side::Managed(m)) = &self.side else {
            unreachable!("--copy-storage goes through a daemon")
        };
        let socket = m.nbd_socket.clone().expect("an NBD socket with disks");
        match storage::copy_until_ready(&mut self.src, &self.disks, &socket, rep).await {
            Ok(_) => Ok(()),
            Err(StorageError::Mirror { node, why }) => {
                let gateway = m.failure_evidence().await.0.into_iter().find_map(|r| {
                    let nbd = r.channel.as_deref().is_some_and(|c| c.starts_with("nbd:"));
                    (nbd && r.ending != crate::outcome::Ending::Completed)
                        .then_some(r.reason)
                        .flatten()
                });
                let why = match gateway {
                    Some(g) => format!("{g} (QEMU: {why})"),
                    None => why,
                };
                Err(Cause::Storage(StorageError::Mirror { node, why }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// At `pre-switchover`: the disks' copies completed, then the
    /// switch-over goes on; if they cannot be, the migration is cancelled
    /// (the source VM resumes on the source with its disks).
    async fn complete_disks(&mut self, rep: &mut Reporter) {
        let done = storage::complete(&mut self.src, &self.disks).await;
        let cont = match &done {
            Ok(()) => {
                rep.step(&format!(
                    "pre-switchover: the guest is stopped; {} final synchronisation; switching over",
                    if self.disks.len() == 1 { "the disk copy completed its" } else { "the disk copies completed their" }
                ));
                self.src
                    .execute(
                        "migrate-continue",
                        Some(serde_json::json!({"state": "pre-switchover"})),
                    )
                    .await
                    .map(drop)
            }
            Err(_) => Ok(()),
        };
        self.storage_done = Some(match (done, cont) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), _) => Err(chain(&e)),
            (Ok(()), Err(e)) => Err(format!("migrate-continue: {}", chain(&e))),
        });
        if let Some(Err(_)) = &self.storage_done {
            let _ = self.src.migrate_cancel().await;
        }
    }

    /// QEMU 7.2 reports `completed` before it has filled in `total-time`
    /// and `downtime` (both 0 when read at once): asks again, briefly.
    async fn final_figures(&mut self, info: MigrationInfo) -> MigrationInfo {
        let mut info = info;
        for _ in 0..20 {
            if info.total_time.is_some_and(|t| t > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            match self.src.query_migrate().await {
                Ok(i) if i.status.as_deref() == Some("completed") => info = i,
                _ => break,
            }
        }
        info
    }

    /// Precopy has not converged after `--postcopy-after-passes` passes
    /// (pass `snap.pass` has begun): `migrate-start-postcopy`.
    async fn start_postcopy(&mut self, rep: &mut Reporter, snap: &Snapshot) {
        // `dirty-sync-count` counts the pass under way: one fewer are done.
        let done = snap.pass.saturating_sub(1);
        self.postcopy.asked_after = Some(done);
        rep.step(&format!(
            "precopy has not converged after {done} pass{} ({} remaining, the guest dirties {}/s): switching to postcopy; from here the migration cannot be cancelled",
            if done == 1 { "" } else { "es" },
            bytes(snap.remaining),
            bytes(snap.dirty_rate),
        ));
        match self.src.migrate_start_postcopy().await {
            Ok(()) => {}
            // QEMU said no: nothing changed, precopy goes on (and may
            // still be cancelled).
            Err(QmpError::Command { desc, .. }) => {
                self.postcopy.asked_after = None;
                self.postcopy.refused = true;
                rep.note(&format!(
                    "the source QEMU refused migrate-start-postcopy ({desc}); the migration stays in precopy"
                ));
            }
            // No answer: the switch may have happened; stay on the safe side.
            Err(e) => rep.note(&format!(
                "migrate-start-postcopy got no answer ({}); treating the migration as in postcopy",
                chain(&e)
            )),
        }
    }

    /// SIGINT/SIGTERM once postcopy has started: cancelling is impossible
    /// (the target runs the VM, pages it lacks are only on the source),
    /// and leaving would cut the in-process gateway. The first signal is
    /// reported and ignored; the next ones pause the migration, which
    /// keeps it recoverable, and the loop then reports where it stands.
    async fn signal_in_postcopy(&mut self, sig: Interrupt, rep: &mut Reporter) {
        self.postcopy.signals += 1;
        if self.postcopy.signals == 1 {
            rep.note(&format!(
                "{}: a migration in postcopy cannot be cancelled (the guest runs on the target and the pages it has not fetched yet are only on the source); continuing until it completes. Another SIGINT/SIGTERM pauses it (migrate-pause): recoverable, but the guest waits for every missing page until then",
                sig.name()
            ));
            return;
        }
        rep.step(&format!(
            "{}: pausing the postcopy migration on the source (migrate-pause)",
            sig.name()
        ));
        match self.src.migrate_pause().await {
            Ok(()) => self.postcopy.paused_by = Some(sig),
            Err(e) => rep.note(&format!(
                "migrate-pause failed ({}); the migration goes on",
                chain(&e)
            )),
        }
    }

    fn recovering(&self) -> bool {
        matches!(self.plan, Plan::Recover { .. })
    }

    async fn prepare_any(&mut self, rep: &mut Reporter) -> Result<(Option<Uuid>, String), Stop> {
        match self.plan {
            Plan::Recover { target, id } => self.prepare_recover(rep, target, id).await,
            _ => self.prepare(rep).await,
        }
    }

    /// `--recover ID`: the source QEMU must be postcopy-paused; the
    /// daemon recovers the target side and a new source gateway carries
    /// the resumed migration. Nothing of the source QEMU's settings
    /// changes: the migration resumes as it was set up.
    async fn prepare_recover(
        &mut self,
        rep: &mut Reporter,
        target: &str,
        id: &str,
    ) -> Result<(Option<Uuid>, String), Stop> {
        let q = |e: QmpError| Stop::Cause(Cause::SourceQemu(e));
        let info = self.src.query_migrate().await.map_err(q)?;
        let status = info.status.unwrap_or_else(|| "none".into());
        if status != "postcopy-paused" {
            return Err(Stop::Cause(Cause::NotPaused { status }));
        }
        // From here the guest is split over the hosts: never cancel.
        self.postcopy.entered = true;
        let uuid = Some(self.src.query_uuid().await.map_err(q)?).filter(|u| !u.is_nil());
        let dn = client_dn(&self.args.x509_dir).map_err(|e| Stop::Cause(e.into()))?;
        rep.step(&format!(
            "source QEMU at {}: VM {} is postcopy-paused; this side authenticates as {dn}",
            self.args.source_qmp.display(),
            uuid.map_or_else(|| "(no -uuid)".to_string(), |u| u.to_string()),
        ));
        let qemu = self
            .src
            .peer_cred()
            .map_err(|e| Stop::Cause(Cause::SourceCred(e)))?;
        self.side = Some(Side::Managed(Box::new(
            Managed::recover(self.args, target, id, &qemu, rep)
                .await
                .map_err(|e| Stop::Cause(e.into()))?,
        )));
        Ok((uuid, dn))
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
        if self.args.copies_storage() {
            let (disks, unnamed) = storage::source_disks(&mut self.src, &self.args.disk)
                .await
                .map_err(|e| Stop::Cause(e.into()))?;
            if !unnamed.is_empty() {
                rep.note(&format!(
                    "not copied: the writable disk{} of {} (QEMU named the node itself; give it node-name= to copy it, or --disk to say which disks)",
                    if unnamed.len() == 1 { "" } else { "s" },
                    unnamed.join(", ")
                ));
            }
            self.disks = disks;
        }
        // Checked before the target is asked for anything: a source QEMU
        // that lacks a capability fails here, in words.
        let caps = std::collections::BTreeMap::from([
            ("return-path".to_string(), true),
            ("validate-uuid".to_string(), uuid.is_some()),
            (MULTIFD.to_string(), self.args.multifd > 0),
            (POSTCOPY_RAM.to_string(), self.args.postcopy),
            (POSTCOPY_PREEMPT.to_string(), self.args.postcopy_preempt),
            // --copy-storage completes the disks' copies there.
            (PAUSE_BEFORE_SWITCHOVER.to_string(), !self.disks.is_empty()),
        ]);
        let offered = self.src.offered_capabilities().await.map_err(q)?;
        capabilities::check(&caps, &offered)
            .map_err(|e| Stop::Cause(Cause::SourceCapability(e)))?;
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
            Plan::Recover { .. } => unreachable!("prepared by prepare_recover"),
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
                    Managed::prepare(
                        self.args,
                        api,
                        forward,
                        Vm {
                            uuid,
                            disks: &self.disks,
                        },
                        &dn,
                        &qemu,
                        rep,
                    )
                    .await
                    .map_err(|e| Stop::Cause(e.into()))?,
                ))
            }
        });

        if self.args.postcopy
            && matches!(
                self.plan,
                Plan::Gateway {
                    forward: TargetForward::Endpoint(_),
                    ..
                }
            )
        {
            rep.note("--postcopy with --forward: the target QEMU must have postcopy-ram on already (whoever ran its migrate-incoming set it); without it the migration fails at its start");
        }
        // Off ones included (when this QEMU has them): a capability left on
        // by an earlier migration must not carry over.
        self.src
            .set_capabilities(capabilities::settable(&caps, &offered))
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
        if self.recovering() {
            return self.not_recovered(stop).await;
        }
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

    /// `--recover` stopped before the source resumed: nothing is cancelled
    /// (the guest is split over the hosts; 7.2 would end its side for good
    /// on migrate_cancel), the sentence says where the migration stands.
    async fn not_recovered(&mut self, stop: Stop) -> Failure {
        let (why, code) = match stop {
            Stop::Cause(c) => (chain(&c), EXIT_FAILED),
            Stop::Interrupted(sig) => (format!("interrupted by {}", sig.name()), sig.exit_code()),
        };
        let status = self.src.query_migrate().await.ok().and_then(|i| i.status);
        let vm = match status.as_deref() {
            Some("postcopy-paused") => {
                cause::postcopy_vm(status.as_deref(), Some(&self.recover_command()))
            }
            // Not in postcopy: nothing of it was touched.
            Some(s) if !s.starts_with("postcopy") => "nothing was changed".to_string(),
            _ => cause::postcopy_vm(status.as_deref(), None),
        };
        Failure {
            sentence: cause::sentence("migration not recovered", &why, &vm),
            exit_code: code,
            source_status: self.src.query_status().await.ok(),
            migration_id: match self.plan {
                Plan::Recover { id, .. } => Some(id.to_string()),
                _ => None,
            },
        }
    }

    /// The command that recovers this migration, as the operator runs it.
    fn recover_command(&self) -> String {
        let id = match (&self.plan, self.side.as_ref().and_then(Side::id)) {
            (Plan::Recover { id, .. }, _) => id.to_string(),
            (_, Some(id)) => id,
            _ => "ID".into(),
        };
        let a = self.args;
        let mut cmd = format!(
            "miggate migrate --recover {id} --source-qmp unix:{} --target {}",
            a.source_qmp.display(),
            a.target.as_deref().unwrap_or("?")
        );
        if let Some(d) = &a.api_x509_dir {
            cmd += &format!(" --api-x509-dir {}", d.display());
        }
        if a.x509_dir.as_os_str() != super::DEFAULT_X509_DIR {
            cmd += &format!(" --x509-dir {}", a.x509_dir.display());
        }
        if let Some(c) = &a.connect {
            cmd += &format!(" --connect {c}");
        }
        if let Some(h) = &a.tls_hostname {
            cmd += &format!(" --tls-hostname {h}");
        }
        cmd
    }

    /// QEMU's verdict was not "completed" (or QMP broke): find the cause.
    async fn failed(
        &mut self,
        rep: &mut Reporter,
        known: Option<Cause>,
        info: Option<&MigrationInfo>,
    ) -> Failure {
        rep.finish_progress();
        // The source keeps its disks; the daemon stops the target's exports.
        storage::abandon(&mut self.src, &self.disks).await;
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
        if self.postcopy.started() {
            let lead = match status.as_deref() {
                Some("postcopy-paused") => "migration paused in postcopy",
                _ => "migration failed in postcopy",
            };
            // The run state says little here (finish-migrate...): the
            // migration's own status tells where the guest is.
            let now = self.src.query_status().await.ok();
            let qemu = match &status {
                Some(s) => Some(s.clone()),
                None => self.src.query_migrate().await.ok().and_then(|i| i.status),
            };
            // Through a daemon, the exact command that recovers it.
            let how = matches!(self.side, Some(Side::Managed(_))).then(|| self.recover_command());
            if let (Some(cmd), Some("postcopy-paused")) = (&how, qemu.as_deref()) {
                rep.note(&format!("to recover the migration, run: {cmd}"));
            }
            return Failure {
                sentence: cause::sentence(
                    lead,
                    &why,
                    &cause::postcopy_vm(qemu.as_deref(), how.as_deref()),
                ),
                exit_code: EXIT_FAILED,
                source_status: now,
                migration_id: self.side.as_ref().and_then(Side::id),
            };
        }
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
        storage::abandon(&mut self.src, &self.disks).await;
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
            postcopy: None,
        };
        // Asked for but not entered: precopy converged before the switch.
        let entered = self.postcopy.entered || ram.postcopy_bytes.is_some_and(|b| b > 0);
        if let (Some(after_passes), true) = (self.postcopy.asked_after, entered) {
            s.postcopy = Some(PostcopySummary {
                after_passes,
                requested_pages: ram.postcopy_requests,
            });
        }
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
