//! Named durations and limits, in one place, each with why its value
//! (socket options live in [`crate::net::socket`]).

use std::time::Duration;

/// Default for `--stall-timeout`: how long a peer may send nothing (during
/// the hello, the first bytes of the stream, or the relay as a whole; and
/// the source gateway's TLS handshake, while the target's has
/// [`DEFAULT_HANDSHAKE`]) before both sides are cut. A healthy QEMU migration
/// writes to its main channel at least every iteration (tens of ms), so
/// 30 s of silence means a wedged or hostile peer, not a slow one.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);

/// Longest `--stall-timeout` / `stall_timeout`: an hour. Beyond that a
/// peer is not slow but gone, and every deadline is `Instant + stall`,
/// which panics when the sum leaves the clock's range.
pub const MAX_STALL_SECS: u64 = 3600;

/// Longest `retention` of ended migrations in the daemon's API: 30 days.
pub const MAX_RETENTION_SECS: u64 = 30 * 86_400;

/// Largest `--rekey-after-mib`: 1 TiB. Also keeps `MIB << 20` in a u64.
pub const MAX_REKEY_AFTER_MIB: u64 = 1 << 20;

/// Longest certificate or CRL validity (`--days`): 100 years; a date past
/// year 9999 cannot be encoded in a certificate.
pub const MAX_DAYS: u32 = 36_500;

/// A configured value outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be from {min} to {max} {unit}, not {value}")]
pub struct OutOfRange {
    pub field: String,
    pub value: u64,
    pub min: u64,
    pub max: u64,
    pub unit: &'static str,
}

/// `value` seconds as a Duration, if within `min..=max`.
pub fn bounded_secs(field: &str, value: u64, min: u64, max: u64) -> Result<Duration, OutOfRange> {
    if (min..=max).contains(&value) {
        Ok(Duration::from_secs(value))
    } else {
        Err(OutOfRange {
            field: field.to_string(),
            value,
            min,
            max,
            unit: "seconds",
        })
    }
}

/// Connecting to the next hop (the target gateway, or the target QEMU).
/// Loopback or a LAN: ten seconds is already generous.
pub const CONNECT: Duration = Duration::from_secs(10);

/// Flushing a refusal verdict to a peer that may not be reading.
pub const VERDICT_WRITE: Duration = Duration::from_secs(5);

/// Shortest time between two TLS key updates a source gateway sends on one
/// channel. GnuTLS (QEMU's native TLS) fails a session that receives more
/// than 8 key updates within one second; one per 250 ms stays well below
/// that whatever the `--rekey-after-mib` interval and the stream's speed.
pub const MIN_REKEY_GAP: Duration = Duration::from_millis(250);

/// Default for `--handshake-timeout`: the whole TLS handshake of a target
/// connection. A real peer finishes it in about a millisecond on a LAN and
/// well under a second across continents; ten seconds leaves room for a
/// loaded host while a peer that stalls mid-handshake holds its slot (see
/// [`DEFAULT_MAX_PENDING`]) for a short time only.
pub const DEFAULT_HANDSHAKE: Duration = Duration::from_secs(10);

/// Longest `--handshake-timeout` accepted: beyond five minutes a stalled
/// handshake is no longer "bounded" in any useful sense.
pub const MAX_HANDSHAKE: Duration = Duration::from_secs(300);

/// Default for `--max-pending`: target connections not yet admitted
/// (TLS handshake, hello, stream check) at one time, from all sources.
/// A migration opens 1 + multifd channels (16 is already many) and each
/// is pending for about a millisecond, so 512 is far above any real
/// load; it caps what a flood costs (a pending connection holds a socket
/// and a TLS session of a few tens of KiB, no relay buffer) well inside
/// the default limit of 1024 descriptors.
pub const DEFAULT_MAX_PENDING: usize = 512;

/// Default for `--max-pending-per-ip`: the same, per source address. Four
/// migrations from one host with 16 multifd channels each still fit, while
/// one hostile address cannot take more than an eighth of the global
/// limit away from the others.
pub const DEFAULT_MAX_PENDING_PER_IP: usize = 64;

/// Largest `--max-pending` accepted: each pending connection is a
/// descriptor, and 65536 is already more than a default process may open.
pub const MAX_PENDING: usize = 65_536;

/// Pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS...). The error
/// repeats until a descriptor is freed, so retrying at once would spin a
/// core; connections close within the handshake or stall timeouts, so a
/// pause of this order costs a real peer little and the listener resumes
/// by itself.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Idle limit of a channel joined to a main channel (postcopy preempt):
/// it is silent whenever the target faults on no page, for as long as the
/// migration lasts, so silence is normal; it ends with its main channel
/// instead (and the stall timeout after that at most). Only a bound for
/// the relay's arithmetic.
pub const JOINED_IDLE: Duration = Duration::from_secs(30 * 86_400);

/// Idle limit of an NBD channel (storage migration). A mirror job that
/// has copied its disk sends only the guest's new writes, so an idle
/// disk is silent for as long as the RAM migration lasts: silence is
/// normal; the channel ends with its block job (or its migration's
/// cancellation). Like [`JOINED_IDLE`], only a bound.
pub const NBD_IDLE: Duration = Duration::from_secs(30 * 86_400);

/// How long the binding of a main channel that failed stays resumable:
/// a postcopy migration whose path was cut waits, paused and split across
/// both hosts, for the operator's `migrate-recover` and resume.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_secs_names_the_field_and_the_range() {
        assert_eq!(
            bounded_secs("stall_timeout", 30, 1, MAX_STALL_SECS),
            Ok(DEFAULT_STALL)
        );
        let e = bounded_secs("target[0].stall_timeout", u64::MAX, 1, MAX_STALL_SECS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "target[0].stall_timeout must be from 1 to 3600 seconds, not 18446744073709551615"
        );
        assert!(bounded_secs("x", 0, 1, 5).is_err());
        // The largest value allowed keeps every deadline in range.
        let _ = tokio::time::Instant::now() + Duration::from_secs(MAX_STALL_SECS);
        let _ = std::time::SystemTime::now() + Duration::from_secs(MAX_RETENTION_SECS);
        const { assert!((MAX_REKEY_AFTER_MIB << 20) >> 20 == MAX_REKEY_AFTER_MIB) };
    }
}
