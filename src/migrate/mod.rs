//! `miggate migrate`: one command that migrates a QEMU VM securely, end to
//! end, as `virsh migrate --tls` does.
//!
//! Gateway mode (default):
//!
//! ```text
//! source QEMU --QMP-- miggate migrate --HTTP--> miggate daemon --QMP--> target QEMU
//!      |                    | (in-process source gateway, ticket in memory)   ^
//!      +--unix socket---->  +====== TLS, ticket in the hello =====> target gateway
//!         (private 0700 directory; only the QEMU's pid is served)
//! ```
//!
//! 1. `query-status`, `query-migrate` (nothing in flight), `query-uuid`;
//! 2. `POST /v1/incoming`: VM UUID, allow = our client certificate's DN,
//!    channels = 1 + multifd, forward = the target QEMU (QMP: the daemon
//!    sets multifd to match and issues `migrate-incoming` itself);
//! 3. the source gateway starts in this process with the one-shot ticket,
//!    on a unix socket in a fresh private directory, serving only the pid
//!    of the QEMU behind the QMP socket (its `SO_PEERCRED`);
//! 4. the source QEMU gets `return-path` (always: without it QEMU calls a
//!    migration completed once the stream is in the socket, before the
//!    target loaded anything), `validate-uuid` (when the VM has a UUID),
//!    multifd, `max-bandwidth` (unlimited unless told: QEMU 7.2 caps it at
//!    32 MiB/s by default), `downtime-limit`, then `migrate`;
//! 5. progress from `query-migrate` until QEMU's verdict;
//! 6. a summary, or one sentence naming the cause of the failure and
//!    confirming the source VM's state.
//!
//! `--native-tls` does the same with QEMU's own TLS on both ends (see
//! [`native`]). SIGINT/SIGTERM cancel on both sides (`migrate_cancel`,
//! `DELETE /v1/migrations/{id}`).
//!
//! A VM started without `-uuid` has the nil UUID: the migration then goes
//! ahead, bound to the target by its one-shot ticket and the peer's DN
//! only, and the command says so.

pub mod storage;
pub mod args;
pub mod cause;
pub mod error;
mod flow;
pub mod managed;
pub mod native;
pub mod progress;
mod signals;
pub mod summary;

pub use args::{parse_qmp, parse_size, MigrateArgs, DEFAULT_X509_DIR};
pub use flow::{client_dn, execute};
pub use summary::{Failure, Summary};

use progress::Reporter;

/// Exit codes: 0 success, 1 the migration failed or was not started,
/// 2 invalid usage, 128 + signal when interrupted (130 SIGINT, 143 SIGTERM).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// `miggate migrate`: runs it, prints, and returns the exit code.
pub async fn run(args: MigrateArgs) -> u8 {
    let mut rep = Reporter::new(args.json);
    match execute(&args, &mut rep).await {
        Ok(summary) => {
            rep.result(&summary.to_json(), &summary.human());
            0
        }
        Err(f) => {
            rep.result(&f.to_json(), &f.sentence);
            f.exit_code
        }
    }
}
