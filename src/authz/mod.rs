//! Authorization of the peer's DN: authz-simple, authz-list, authz-list-file.

/// The result of an authorization check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The reason is a full sentence for the operator, e.g.
    /// `peer CN=x,O=y not allowed by ACL /etc/miggate/acl.json`.
    Deny { reason: String },
}

/// An access check on a peer identity (the subject DN string).
pub trait Authz: Send + Sync {
    fn check(&self, identity: &str) -> Decision;
}
