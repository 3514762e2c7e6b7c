//! Migration capabilities checked against what a QEMU offers before they
//! are set, so that a missing or unsafe combination is refused in words
//! instead of QEMU's (or, worse, accepted by a QEMU that then breaks).
//!
//! Used on both ends: `miggate migrate` for the source QEMU, the daemon
//! for the target QEMU of a QMP-forward registration.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub const POSTCOPY_RAM: &str = "postcopy-ram";
pub const POSTCOPY_PREEMPT: &str = "postcopy-preempt";
pub const MULTIFD: &str = "multifd";
pub const PAUSE_BEFORE_SWITCHOVER: &str = "pause-before-switchover";

/// The first QEMU that migrates with multifd and postcopy-ram together.
/// 10.0 refuses the pair ("Postcopy is not yet compatible with multifd");
/// 7.2 takes it without a word and the migration breaks at the switch.
pub const POSTCOPY_WITH_MULTIFD_SINCE: (u64, u64) = (10, 1);

/// A capability that needs another one on (QEMU checks the same, later and
/// in its own words).
const REQUIRES: &[(&str, &str)] = &[(POSTCOPY_PREEMPT, POSTCOPY_RAM)];

/// What one QEMU offers: `query-migrate-capabilities` and its version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    pub version: Option<(u64, u64, u64)>,
    pub names: BTreeSet<String>,
}

impl Offered {
    fn qemu(&self) -> QemuName {
        QemuName(self.version)
    }
}

/// "QEMU 7.2.22", or "this QEMU" when its greeting had no version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuName(pub Option<(u64, u64, u64)>);

impl fmt::Display for QemuName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((a, b, c)) => write!(f, "QEMU {a}.{b}.{c}"),
            None => f.write_str("this QEMU"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("{capability} needs {needs} on too")]
    Requires {
        capability: String,
        needs: &'static str,
    },
    #[error("{qemu} has no migration capability {capability}")]
    Missing { capability: String, qemu: QemuName },
    #[error(
        "postcopy-ram with multifd needs QEMU {}.{} or later on both ends, not {qemu} (before, QEMU refuses the pair, or takes it and breaks at the switch to postcopy); migrate without multifd",
        POSTCOPY_WITH_MULTIFD_SINCE.0,
        POSTCOPY_WITH_MULTIFD_SINCE.1
    )]
    PostcopyWithMultifd { qemu: QemuName },
}

/// The rules that hold whatever the QEMU: a capability turned on with
/// what it needs turned on too.
pub fn check_consistent(requested: &BTreeMap<String, bool>) -> Result<(), CapabilityError> {
    let on = |c: &str| requested.get(c).copied().unwrap_or(false);
    for (cap, needs) in REQUIRES {
        if on(cap) && !on(needs) {
            return Err(CapabilityError::Requires {
                capability: (*cap).to_string(),
                needs,
            });
        }
    }
    Ok(())
}

/// `requested` against what `offered` has: every capability turned on
/// must exist; one turned off may be missing (it is then left out, see
/// [`settable`]); postcopy-ram with multifd only where QEMU supports it.
pub fn check(requested: &BTreeMap<String, bool>, offered: &Offered) -> Result<(), CapabilityError> {
    check_consistent(requested)?;
    if let Some((cap, _)) = requested
        .iter()
        .find(|(c, on)| **on && !offered.names.contains(*c))
    {
        return Err(CapabilityError::Missing {
            capability: cap.clone(),
            qemu: offered.qemu(),
        });
    }
    let on = |c: &str| requested.get(c).copied().unwrap_or(false);
    let new_enough = offered
        .version
        .is_some_and(|(a, b, _)| (a, b) >= POSTCOPY_WITH_MULTIFD_SINCE);
    if on(POSTCOPY_RAM) && on(MULTIFD) && !new_enough {
        return Err(CapabilityError::PostcopyWithMultifd {
            qemu: offered.qemu(),
        });
    }
    Ok(())
}

/// The capabilities to send: those this QEMU has. A capability it lacks
/// and that is requested off is already off.
pub fn settable<'a>(
    requested: &'a BTreeMap<String, bool>,
    offered: &'a Offered,
) -> impl Iterator<Item = (&'a String, bool)> + 'a {
    requested
        .iter()
        .filter(|(c, on)| **on || offered.names.contains(*c))
        .map(|(c, on)| (c, *on))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(caps: &[(&str, bool)]) -> BTreeMap<String, bool> {
        caps.iter().map(|(c, on)| (c.to_string(), *on)).collect()
    }

    fn qemu(version: (u64, u64, u64), names: &[&str]) -> Offered {
        Offered {
            version: Some(version),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn preempt_needs_postcopy_ram() {
        let e = check_consistent(&req(&[(POSTCOPY_PREEMPT, true), (POSTCOPY_RAM, false)]));
        assert_eq!(
            e.unwrap_err().to_string(),
            "postcopy-preempt needs postcopy-ram on too"
        );
        check_consistent(&req(&[(POSTCOPY_PREEMPT, true), (POSTCOPY_RAM, true)])).unwrap();
        check_consistent(&req(&[(POSTCOPY_PREEMPT, false)])).unwrap();
    }

    #[test]
    fn a_capability_on_must_be_offered_one_off_may_be_missing() {
        let old = qemu((6, 2, 0), &[POSTCOPY_RAM, MULTIFD]);
        let r = req(&[(POSTCOPY_RAM, true), (POSTCOPY_PREEMPT, true)]);
        assert_eq!(
            check(&r, &old).unwrap_err().to_string(),
            "QEMU 6.2.0 has no migration capability postcopy-preempt"
        );
        let r = req(&[(POSTCOPY_RAM, true), (POSTCOPY_PREEMPT, false)]);
        check(&r, &old).unwrap();
        let sent: Vec<_> = settable(&r, &old).collect();
        assert_eq!(sent, [(&POSTCOPY_RAM.to_string(), true)]);
    }

    #[test]
    fn postcopy_with_multifd_only_from_10_1() {
        let r = req(&[(POSTCOPY_RAM, true), (MULTIFD, true)]);
        let names = [POSTCOPY_RAM, MULTIFD, POSTCOPY_PREEMPT];
        let e = check(&r, &qemu((7, 2, 22), &names)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("postcopy-ram with multifd needs QEMU 10.1 or later on both ends, not QEMU 7.2.22 ("),
            "{e}"
        );
        assert!(check(&r, &qemu((10, 0, 2), &names)).is_err());
        let unknown = Offered {
            version: None,
            ..qemu((0, 0, 0), &names)
        };
        assert!(check(&r, &unknown).is_err());
        check(&r, &qemu((10, 1, 0), &names)).unwrap();
        check(
            &req(&[(POSTCOPY_RAM, true), (MULTIFD, false)]),
            &qemu((7, 2, 22), &names),
        )
        .unwrap();
    }
}
