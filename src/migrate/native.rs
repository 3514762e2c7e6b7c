//! `--native-tls`: no gateway, no daemon. QEMU's own TLS on both ends,
//! configured over QMP exactly as the seeds do it by hand:
//!
//! ```text
//! target: object-add tls-creds-x509 id=miggate-tls0 dir=D endpoint=server verify-peer=on
//!         object-add authz-simple id=miggate-authz0 identity=<the source's client DN>
//!         migrate-set-parameters tls-creds=miggate-tls0 tls-authz=miggate-authz0
//!         migrate-incoming tcp:HOST:PORT
//! source: object-add tls-creds-x509 id=miggate-tls0 dir=D endpoint=client verify-peer=on
//!         migrate-set-parameters tls-creds=miggate-tls0 tls-hostname=HOST
//!         migrate-set-capabilities return-path validate-uuid; migrate tcp:HOST:PORT
//! ```
//!
//! With `--authz-list-file F` the target gets `authz-list-file` (QEMU's
//! live-reloaded ACL) where its `object-add` accepts that `qom-type`, as
//! its QMP schema says. QEMU 7.2 and 10.0 do not (their QAPI enum names
//! it `authz-listfile`, which is no QOM type, so neither name can be
//! created): there the rules of F are loaded into an `authz-list`
//! instead, which does not follow later edits of F, and the command says
//! so. Where the schema does accept it, a refusal is an error: falling
//! back would silently drop the live reload the operator asked for.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::args::{host_of, MigrateArgs};
use super::progress::Reporter;
use crate::authz::{Authz, Decision, List, Simple};
use crate::net::HostPort;
use crate::qmp::{MigrationParameters, Qmp, QmpError};

pub const CREDS_ID: &str = "miggate-tls0";
pub const AUTHZ_ID: &str = "miggate-authz0";
/// QEMU's live-reloaded ACL file object (its QOM type name).
pub const AUTHZ_LIST_FILE: &str = "authz-list-file";

/// Where the target QEMU listens unless `--connect` says otherwise: both
/// QMP sockets are local, so both QEMUs are too.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// A completed migration's VM starts on the target a moment later.
const TARGET_RUNNING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Native {
    target: Qmp,
    target_path: PathBuf,
    uri: String,
    /// Our prediction of the target's tls-authz decision about our DN, when
    /// it is a denial: QEMU logs its own only to its stderr, and the source
    /// QEMU merely sees the TLS session drop.
    authz_denial: Option<String>,
}

/// `object-del` (ignoring "not found") then `object-add`: a second run
/// against the same QEMUs replaces the objects of the first.
async fn replace_object(q: &mut Qmp, props: Value) -> Result<(), QmpError> {
    let id = props["id"].as_str().unwrap_or_default().to_string();
    let _ = q.object_del(&id).await;
    q.object_add(props).await
}

fn tls_creds(dir: &Path, endpoint: &str) -> Result<Value, NativeError> {
    let dir = dir
        .to_str()
        .ok_or_else(|| NativeError::PkiPathNotUtf8(dir.to_path_buf()))?;
    Ok(json!({
        "qom-type": "tls-creds-x509",
        "id": CREDS_ID,
        "dir": dir,
        "endpoint": endpoint,
        "verify-peer": true,
    }))
}

/// The QOM properties of an `authz-list` holding the rules of an ACL file.
pub fn authz_list_props(list: &List) -> Value {
    let rules: Vec<Value> = list
        .rules()
        .iter()
        .map(|r| {
            json!({
                "match": r.pattern,
                "policy": r.policy.as_str(),
                "format": r.format.as_str(),
            })
        })
        .collect();
    json!({
        "qom-type": "authz-list",
        "id": AUTHZ_ID,
        "rules": rules,
        "policy": list.policy().as_str(),
    })
}

/// Why `object-add` will not take `authz-list-file`, from its `qom-type`s.
fn why_no_list_file(types: &[String]) -> &'static str {
    if types.iter().any(|t| t == "authz-listfile") {
        "its object-add does not accept that qom-type (the QMP schema names it authz-listfile, which is no QOM type)"
    } else {
        "its object-add does not accept that qom-type"
    }
}

/// Why native TLS mode could not prepare the two QEMUs.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("cannot connect to the target QEMU's QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("target QEMU")]
    TargetQemu(#[source] QmpError),
    #[error("source QEMU")]
    SourceQemu(#[source] QmpError),
    #[error(
        "the target QEMU is {status}, not waiting for a migration (start it with -incoming defer)"
    )]
    NotIncoming { status: String },
    #[error("target QEMU: no listening port in {raw}")]
    NoPort { raw: Value },
    #[error("PKI path {} is not UTF-8", .0.display())]
    PkiPathNotUtf8(PathBuf),
    #[error("ACL path {} is not UTF-8", .0.display())]
    AclPathNotUtf8(PathBuf),
    #[error("cannot read {name}")]
    ReadAcl {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the target QEMU cannot load {name} as authz-list-file (the QEMU process must be able to read it)")]
    AuthzListFile {
        name: String,
        #[source]
        source: QmpError,
    },
    #[error("{name}")]
    Acl {
        name: String,
        #[source]
        source: crate::authz::AclError,
    },
}

impl Native {
    /// Sets up TLS on both QEMUs and starts the target listening.
    pub async fn prepare(
        args: &MigrateArgs,
        target_qmp: &Path,
        src: &mut Qmp,
        dn: &str,
        rep: &mut Reporter,
    ) -> Result<Native, NativeError> {
        let path = target_qmp.to_path_buf();
        let mut target = Qmp::connect_unix(&path)
            .await
            .map_err(|source| NativeError::Connect {
                path: path.clone(),
                source,
            })?;
        let q = NativeError::TargetQemu;
        let status = target.query_status().await.map_err(q)?;
        if status != "inmigrate" {
            return Err(NativeError::NotIncoming { status });
        }
        let target_dir = args.target_x509_dir.as_deref().unwrap_or(&args.x509_dir);
        replace_object(&mut target, tls_creds(target_dir, "server")?)
            .await
            .map_err(q)?;

        let (authz, decision) = match &args.authz_list_file {
            None => {
                let identity = args.authz_identity.as_deref().unwrap_or(dn);
                replace_object(
                    &mut target,
                    json!({"qom-type": "authz-simple", "id": AUTHZ_ID, "identity": identity}),
                )
                .await
                .map_err(q)?;
                (
                    format!("authz-simple identity {identity}"),
                    Simple::new(identity).check(dn),
                )
            }
            Some(file) => Self::authz_from_file(&mut target, file, dn, rep).await?,
        };
        // Same DN rendering and rule semantics as QEMU (see crate::authz).
        let authz_denial = match decision {
            Decision::Allow => None,
            Decision::Deny { reason } => {
                rep.note(&format!(
                    "the target QEMU's tls-authz will refuse this side: {reason}"
                ));
                Some(format!("its tls-authz refused the TLS session ({reason})"))
            }
        };
        let (caps, params) = super::managed::target_migration_settings(args.multifd);
        target
            .set_capabilities(caps.iter().map(|(c, on)| (c, *on)))
            .await
            .map_err(q)?;
        let params = MigrationParameters {
            tls_creds: Some(CREDS_ID.into()),
            tls_authz: Some(AUTHZ_ID.into()),
            other: params,
            ..Default::default()
        };
        target.set_parameters(&params).await.map_err(q)?;

        let listen = args.connect.as_deref().unwrap_or(DEFAULT_LISTEN);
        target
            .migrate_incoming(&format!("tcp:{listen}"))
            .await
            .map_err(q)?;
        let host = host_of(listen);
        let port = match listen.parse::<HostPort>() {
            Ok(hp) if hp.port != 0 => hp.port,
            // Port 0 (or an address QEMU took that is not HOST:PORT): ask
            // QEMU where it listens.
            _ => {
                let info = target.query_migrate().await.map_err(q)?;
                let port = info.raw["socket-address"][0]["port"]
                    .as_str()
                    .and_then(|p| p.parse::<u16>().ok());
                port.ok_or(NativeError::NoPort { raw: info.raw })?
            }
        };
        let addr = HostPort { host, port };
        rep.step(&format!(
            "target QEMU at {}: TLS server with {} (verify-peer on), {authz}, listening on {addr}",
            path.display(),
            target_dir.display()
        ));

        let qs = NativeError::SourceQemu;
        replace_object(src, tls_creds(&args.x509_dir, "client")?)
            .await
            .map_err(qs)?;
        let tls_hostname = args
            .tls_hostname
            .clone()
            .unwrap_or_else(|| addr.host.clone());
        let params = MigrationParameters {
            tls_creds: Some(CREDS_ID.into()),
            tls_hostname: Some(tls_hostname.clone()),
            ..Default::default()
        };
        src.set_parameters(&params).await.map_err(qs)?;
        rep.step(&format!(
            "source QEMU: TLS client with {} (identity {dn}), the target must present a certificate for {tls_hostname}",
            args.x509_dir.display()
        ));
        Ok(Native {
            target,
            target_path: path,
            uri: format!("tcp:{addr}"),
            authz_denial,
        })
    }

    /// The target's tls-authz from an ACL file, and its decision about `dn`.
    async fn authz_from_file(
        target: &mut Qmp,
        file: &Path,
        dn: &str,
        rep: &mut Reporter,
    ) -> Result<(String, Decision), NativeError> {
        let q = NativeError::TargetQemu;
        let name = file
            .to_str()
            .ok_or_else(|| NativeError::AclPathNotUtf8(file.to_path_buf()))?;
        // Parsed here too: a broken file is reported before QEMU sees it.
        let text = std::fs::read(file).map_err(|source| NativeError::ReadAcl {
            name: name.to_string(),
            source,
        })?;
        let list = List::from_json(name, &text).map_err(|source| NativeError::Acl {
            name: name.to_string(),
            source,
        })?;
        let decision = list.check(dn);
        // Asked, not tried: a failed object-add of a type QEMU does accept
        // is a real error (an unreadable file), not a missing feature.
        let types = target.object_add_types().await.map_err(q)?;
        if types.iter().any(|t| t == AUTHZ_LIST_FILE) {
            let as_file = json!({
                "qom-type": AUTHZ_LIST_FILE, "id": AUTHZ_ID, "filename": name, "refresh": true,
            });
            replace_object(target, as_file)
                .await
                .map_err(|source| NativeError::AuthzListFile {
                    name: name.to_string(),
                    source,
                })?;
            return Ok((
                format!("{AUTHZ_LIST_FILE} {name} (reloaded on change)"),
                decision,
            ));
        }
        replace_object(target, authz_list_props(&list))
            .await
            .map_err(q)?;
        let version = target
            .qemu_version()
            .map_or_else(String::new, |(a, b, c)| format!(" ({a}.{b}.{c})"));
        rep.note(&format!(
            "this QEMU{version} cannot create {AUTHZ_LIST_FILE}: {}; its {} rule(s) were loaded into an authz-list instead, which does not follow later edits of the file",
            why_no_list_file(&types),
            list.rules().len()
        ));
        Ok((format!("authz-list from {name}"), decision))
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The target QEMU's `error-desc`; else its tls-authz denial of our DN;
    /// else, if it is gone, that it exited (a target whose incoming
    /// migration failed usually does).
    pub async fn target_error(&mut self) -> Option<String> {
        let exited = match self.target.query_migrate().await {
            Ok(info) if info.error_desc.is_some() => return info.error_desc,
            Ok(_) => false,
            Err(QmpError::Closed | QmpError::Io { .. }) => true,
            Err(_) => false,
        };
        self.authz_denial.clone().or_else(|| {
            exited.then(|| {
                format!(
                    "the target QEMU ({}) exited; its log says why",
                    self.target_path.display()
                )
            })
        })
    }

    /// Waits (briefly) for the target VM to reach `want`; returns what it is.
    pub async fn target_status(&mut self, want: &str) -> Option<String> {
        let deadline = tokio::time::Instant::now() + TARGET_RUNNING_WAIT;
        loop {
            let s = self.target.query_status().await.ok()?;
            if s == want || tokio::time::Instant::now() >= deadline {
                return Some(s);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A QMP peer on a unix socket in `dir`: answers each command with
    /// `answers[name]` (default `{"return": {}}`) and returns what it was sent.
    fn scripted_qmp(
        dir: &Path,
        answers: Vec<(&'static str, Value)>,
    ) -> (PathBuf, tokio::task::JoinHandle<Vec<Value>>) {
        let path = dir.join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let greeting = json!({"QMP": {"version": {"qemu": {"major": 99, "minor": 1, "micro": 0}}, "capabilities": []}});
            w.write_all(format!("{greeting}\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).unwrap();
                let name = req["execute"].as_str().unwrap_or_default();
                let mut answer = answers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or_else(|| json!({"return": {}}), |(_, a)| a.clone());
                answer["id"] = req["id"].clone();
                w.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
                seen.push(req);
            }
            seen
        });
        (path, task)
    }

    /// A schema whose object-add takes `types` as qom-type.
    fn schema(types: &[&str]) -> Value {
        json!({"return": [
            {"name": "object-add", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "1", "meta-type": "object", "members": [{"name": "qom-type", "type": "2"}]},
            {"name": "2", "meta-type": "enum", "values": types},
        ]})
    }

    #[derive(Clone, Default)]
    struct Notes(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Notes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `authz_from_file` against a scripted QEMU: its result, the
    /// `object-add`s it sent, and the reporter's output.
    async fn from_file(
        answers: Vec<(&'static str, Value)>,
    ) -> (Result<(String, Decision), NativeError>, Vec<Value>, String) {
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("acl.json");
        std::fs::write(
            &acl,
            r#"{"rules":[{"match":"O=a,CN=*","policy":"allow","format":"glob"}],"policy":"deny"}"#,
        )
        .unwrap();
        let (path, peer) = scripted_qmp(dir.path(), answers);
        let notes = Notes::default();
        let mut rep = Reporter::to_writer(true, Box::new(notes.clone()));
        let mut q = Qmp::connect_unix(&path).await.unwrap();
        let r = Native::authz_from_file(&mut q, &acl, "O=a,CN=b", &mut rep).await;
        drop(q);
        let adds = peer
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c["execute"] == "object-add")
            .collect();
        let out = String::from_utf8(notes.0.lock().unwrap().clone()).unwrap();
        (r, adds, out)
    }

    #[tokio::test]
    async fn acl_file_becomes_authz_list_file_where_object_add_takes_it() {
        let (r, adds, out) = from_file(vec![(
            "query-qmp-schema",
            schema(&["authz-list", "authz-list-file"]),
        )])
        .await;
        let (what, decision) = r.unwrap();
        assert!(what.starts_with("authz-list-file "), "{what}");
        assert_eq!(decision, Decision::Allow);
        assert_eq!(adds.len(), 1, "{adds:?}");
        assert_eq!(adds[0]["arguments"]["qom-type"], "authz-list-file");
        assert_eq!(adds[0]["arguments"]["refresh"], true);
        assert!(!out.contains("note"), "{out}");
    }

    /// A QEMU that can create authz-list-file but refuses this one (QEMU
    /// cannot read the file): an error with QEMU's reason, no fallback.
    #[tokio::test]
    async fn authz_list_file_refused_by_a_qemu_that_has_it_is_an_error() {
        let (r, adds, out) = from_file(vec![
            (
                "query-qmp-schema",
                schema(&["authz-list", "authz-list-file"]),
            ),
            (
                "object-add",
                json!({"error": {"class": "GenericError",
                                 "desc": "Unable to read '/x/acl.json': Permission denied"}}),
            ),
        ])
        .await;
        let e = r.unwrap_err();
        assert!(matches!(e, NativeError::AuthzListFile { .. }), "{e:?}");
        let text = crate::error::chain(&e);
        assert!(
            text.contains("cannot load") && text.contains("Permission denied"),
            "{text}"
        );
        assert_eq!(adds.len(), 1, "no authz-list fallback: {adds:?}");
        assert!(!out.contains("note"), "{out}");
    }

    /// QEMU 7.2 to 10.0: the schema says authz-listfile; nothing is tried
    /// with authz-list-file, the rules go into an authz-list, with a note.
    #[tokio::test]
    async fn acl_file_falls_back_to_authz_list_where_object_add_lacks_it() {
        let (r, adds, out) = from_file(vec![(
            "query-qmp-schema",
            schema(&["authz-list", "authz-listfile", "authz-simple"]),
        )])
        .await;
        assert!(r.unwrap().0.starts_with("authz-list from "));
        assert_eq!(adds.len(), 1, "{adds:?}");
        assert_eq!(adds[0]["arguments"]["qom-type"], "authz-list");
        assert!(
            out.contains("this QEMU (99.1.0) cannot create authz-list-file")
                && out.contains("names it authz-listfile")
                && out.contains("1 rule(s)"),
            "{out}"
        );
    }

    #[test]
    fn acl_file_becomes_authz_list_props() {
        let list = List::from_json(
            "f",
            br#"{"rules":[{"match":"O=a,CN=*","policy":"allow","format":"glob"},
                          {"match":"dan*","policy":"deny"}]}"#,
        )
        .unwrap();
        let p = authz_list_props(&list);
        assert_eq!(p["qom-type"], "authz-list");
        assert_eq!(p["policy"], "deny");
        assert_eq!(
            p["rules"],
            json!([
                {"match": "O=a,CN=*", "policy": "allow", "format": "glob"},
                {"match": "dan*", "policy": "deny", "format": "exact"}
            ])
        );
    }
}
