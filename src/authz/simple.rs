//! QEMU's authz-simple: one allowed identity.
//!
//! authz/simple.c `qauthz_simple_is_allowed` is `g_str_equal(identity,
//! sauthz->identity)`: exact, whole-string, case-sensitive; no DN
//! normalisation, so the string must be written the way GnuTLS prints the
//! certificate's subject (see creds::dn).

use super::{shown, Authz, Decision};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Simple {
    identity: String,
}

impl Simple {
    pub fn new(identity: impl Into<String>) -> Self {
        Simple {
            identity: identity.into(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl Authz for Simple {
    fn check(&self, identity: &str) -> Decision {
        if identity == self.identity {
            Decision::Allow
        } else {
            Decision::Deny {
                reason: format!(
                    "peer {} does not match the authorized identity {}",
                    shown(identity),
                    self.identity
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DN: &str = "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com";

    #[test]
    fn exact_whole_string_case_sensitive() {
        let a = Simple::new(DN);
        assert_eq!(a.check(DN), Decision::Allow);
        assert_ne!(a.check(&DN.to_lowercase()), Decision::Allow);
        assert_ne!(a.check(&DN[..DN.len() - 1]), Decision::Allow);
        assert_ne!(a.check(&format!("{DN},OU=x")), Decision::Allow);
        // The reversed order certtool displays is a different identity.
        assert_ne!(
            a.check("CN=laptop.example.com,O=Example Org,L=London,ST=London,C=GB"),
            Decision::Allow
        );
        // No glob semantics.
        assert_ne!(Simple::new("CN=*").check("CN=x"), Decision::Allow);
    }

    #[test]
    fn deny_reason_names_both() {
        assert_eq!(
            Simple::new("CN=y").check("CN=x"),
            Decision::Deny {
                reason: "peer CN=x does not match the authorized identity CN=y".into()
            }
        );
    }
}
