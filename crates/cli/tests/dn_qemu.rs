//! `miggate::creds::dn::subject_dn` against QEMU's own tls-authz.
//!
//! For each awkward client certificate, the string we compute must be
//! exactly the one QEMU (GnuTLS `gnutls_x509_crt_get_dn`) hands to
//! authz-simple:
//! * a QEMU whose authz holds a wrong string (the reversed RDN order that
//!   `certtool -i` displays) denies the peer and reports, on stderr, the DN
//!   it computed: it must equal ours. One QEMU serves all these probes, since
//!   a denial leaves the listener open and tls-authz is resolved per use;
//! * a fresh QEMU whose authz holds our string lets the incoming migration
//!   go `active` (an allowed peer that then sends no stream makes the target
//!   exit, hence one QEMU per allowed probe).
//!
//! Certificates come from the openssl CLI (and certtool for a value that is
//! not a string, which openssl cannot write); the TLS client is gnutls-cli.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::qemu::{NativeTls, Qemu, QemuOpts, TlsEndpoint, TLS_AUTHZ_ID};
use miggate::creds::dn::subject_dn;
use serde_json::json;

/// How long QEMU may take to decide about one TLS client.
const STEP: Duration = Duration::from_secs(30);
/// Period of the stderr polls while awaiting a decision (see
/// `Target::await_decision`).
const POLL: Duration = Duration::from_millis(20);

/// One client certificate to probe, and the DN we expect for it.
struct Case {
    label: &'static str,
    subj: &'static str,
    /// Extra `openssl req` arguments / config lines, or a certtool template.
    how: How,
    expect: &'static str,
}

enum How {
    Openssl(&'static [&'static str], &'static str),
    Certtool(&'static str),
}

const CASES: &[Case] = &[
    Case {
        label: "London example",
        subj: "/C=GB/ST=London/L=London/O=Example Org/CN=laptop.example.com",
        how: How::Openssl(&[], ""),
        expect: "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com",
    },
    Case {
        label: "specials , + \" \\ ; < > =",
        subj: r#"/O=Example\, Inc./CN=a\+b"c\\d;e<f>g=h"#,
        how: How::Openssl(&[], ""),
        expect: r#"O=Example\, Inc.,CN=a\+b\"c\\d\;e\<f\>g=h"#,
    },
    Case {
        label: "leading # and spaces",
        subj: "/CN=#lead/O= both /OU=trail ",
        how: How::Openssl(&[], ""),
        expect: r"CN=\#lead,O=\ both\ ,OU=trail\ ",
    },
    Case {
        label: "multi-valued RDN",
        subj: "/O=Org/OU=a+CN=b",
        how: How::Openssl(&["-multivalue-rdn"], ""),
        expect: "O=Org,CN=b+OU=a",
    },
    Case {
        label: "UTF8String",
        subj: "/CN=Zürich Ünïcode 東京",
        how: How::Openssl(&[], ""),
        expect: "CN=Zürich Ünïcode 東京",
    },
    Case {
        label: "DC, two OU, emailAddress",
        subj: "/DC=example/DC=com/OU=one/OU=two/CN=joe/emailAddress=joe@example.com",
        how: How::Openssl(&[], ""),
        expect: "DC=example,DC=com,OU=one,OU=two,CN=joe,EMAIL=joe@example.com",
    },
    Case {
        label: "unknown OID",
        subj: "/myAttr=hello/CN=x",
        how: How::Openssl(&[], "oid_section = oids\n[ oids ]\nmyAttr = 1.2.3.4\n"),
        expect: "1.2.3.4=#0c0568656c6c6f,CN=x",
    },
    Case {
        label: "BMPString (string_mask=pkix)",
        subj: "/CN=Zürich/O=a_b@c",
        how: How::Openssl(&[], "string_mask = pkix\n"),
        expect: "CN=Zürich,O=a_b@c",
    },
    Case {
        label: "TeletexString (string_mask=nombstr)",
        subj: "/CN=Zürich/O=a_b@c/OU=plain",
        how: How::Openssl(&[], "string_mask = nombstr\n"),
        expect: r"CN=\#5afc72696368,O=a_b@c,OU=plain",
    },
    Case {
        label: "INTEGER value (certtool)",
        subj: "",
        how: How::Certtool("dn = \"CN=int,1.2.3.4=#020105\"\n"),
        expect: "1.2.3.4=#020105,CN=int",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_authorizes_exactly_our_dn() {
    require_tools();
    let pki = Pki::new();
    let certs: Vec<(&Case, PathBuf, String)> = CASES
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let cert = pki.client_cert(i, case);
            let ours = subject_dn(&pem_to_der(&cert))
                .unwrap_or_else(|e| panic!("{}: subject_dn failed: {e}", case.label));
            assert_eq!(ours, case.expect, "{}: our rendering", case.label);
            (case, cert, ours)
        })
        .collect();

    // Wrong strings are denied, and QEMU reports computing exactly ours.
    let mut target = Target::start(pki.dir(), "CN=replaced before each probe").await;
    for (case, cert, ours) in &certs {
        target.set_authz(&wrong_variant(ours)).await;
        match target.probe(pki.dir(), cert).await {
            Decision::Denied(reported) => assert_eq!(&reported, ours, "{}", case.label),
            Decision::Allowed => panic!("{}: QEMU allowed a wrong DN", case.label),
        }
    }
    drop(target);

    // Our exact string is allowed (one target each, started side by side).
    let mut probes = tokio::task::JoinSet::new();
    for (case, cert, ours) in &certs {
        let (label, dir, cert, ours) =
            (case.label, pki.dir().to_owned(), cert.clone(), ours.clone());
        probes.spawn(async move {
            let mut target = Target::start(&dir, &ours).await;
            match target.probe(&dir, &cert).await {
                Decision::Allowed => eprintln!("QEMU allowed {label:40} {ours}"),
                Decision::Denied(dn) => panic!("{label}: QEMU denied; it computed {dn}"),
            }
        });
    }
    while let Some(done) = probes.join_next().await {
        done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }
}

/// The RDNs in reverse (what `certtool -i` prints), or, for a single RDN,
/// the string with one character changed.
fn wrong_variant(dn: &str) -> String {
    let mut rdns = Vec::new();
    let mut cur = String::new();
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend([c].into_iter().chain(chars.next())),
            ',' => rdns.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    rdns.push(cur);
    rdns.reverse();
    let reversed = rdns.join(",");
    if reversed != dn {
        reversed
    } else {
        format!("{dn}x")
    }
}

fn require_tools() {
    let ok = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    assert!(
        ok("openssl", "version"),
        "openssl not found: apt-get install openssl"
    );
    for tool in ["certtool", "gnutls-cli"] {
        assert!(
            ok(tool, "--version"),
            "{tool} not found: apt-get install gnutls-bin"
        );
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pem_to_der(pem: &Path) -> Vec<u8> {
    // certtool, not openssl: OpenSSL cannot parse a DN holding an INTEGER.
    let der = pem.with_extension("der");
    run(Command::new("certtool")
        .args(["--certificate-info", "--outder", "--infile"])
        .arg(pem)
        .arg("--outfile")
        .arg(&der));
    fs::read(der).unwrap()
}

/// A QEMU-layout PKI directory (CA + server) plus one client key.
struct Pki {
    tmp: tempfile::TempDir,
}

const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

impl Pki {
    fn new() -> Self {
        let pki = Pki {
            tmp: tempfile::tempdir().unwrap(),
        };
        let d = pki.dir();
        fs::write(d.join("req.cnf"), "[req]\ndistinguished_name=dn\n[dn]\n").unwrap();
        run(pki
            .openssl("req")
            .args(["-x509", "-nodes", "-days", "2", "-subj", "/CN=Test CA"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            .args(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
        for key in ["server-key.pem", "client-key.pem"] {
            run(pki
                .openssl("genpkey")
                .args(["-algorithm", "EC", "-out", key])
                .args(["-pkeyopt", "ec_paramgen_curve:P-256"]));
        }
        let server_ext = "basicConstraints=critical,CA:FALSE\n\
            keyUsage=critical,digitalSignature,keyEncipherment\n\
            extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n";
        pki.sign(
            "server",
            "server-key.pem",
            "/CN=127.0.0.1",
            &[],
            "",
            server_ext,
        );
        pki
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn openssl(&self, sub: &str) -> Command {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(self.dir()).arg(sub);
        cmd
    }

    /// openssl req + x509 -req, signed by the CA; returns the cert path.
    fn sign(
        &self,
        name: &str,
        key: &str,
        subj: &str,
        args: &[&str],
        cnf: &str,
        ext: &str,
    ) -> PathBuf {
        let d = self.dir();
        let (cnf_file, ext_file) = (format!("{name}.cnf"), format!("{name}.ext"));
        fs::write(
            d.join(&cnf_file),
            format!("{cnf}[req]\ndistinguished_name=dn\n[dn]\n"),
        )
        .unwrap();
        fs::write(d.join(&ext_file), ext).unwrap();
        let csr = format!("{name}.csr");
        run(self
            .openssl("req")
            .args(["-new", "-utf8", "-config", &cnf_file, "-key", key])
            .args(["-subj", subj, "-out", &csr])
            .args(args));
        let cert = format!("{name}-cert.pem");
        run(self
            .openssl("x509")
            .args(["-req", "-days", "2", "-in", &csr, "-extfile", &ext_file])
            .args(["-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-out", &cert]));
        d.join(cert)
    }

    fn client_cert(&self, i: usize, case: &Case) -> PathBuf {
        let name = format!("client{i}");
        match case.how {
            How::Openssl(args, cnf) => {
                self.sign(&name, "client-key.pem", case.subj, args, cnf, CLIENT_EXT)
            }
            How::Certtool(template) => {
                let tmpl = self.dir().join(format!("{name}.tmpl"));
                let extra = "tls_www_client\nsigning_key\nencryption_key\nexpiration_days = 2\n";
                fs::write(&tmpl, format!("{template}{extra}")).unwrap();
                let cert = self.dir().join(format!("{name}-cert.pem"));
                run(Command::new("certtool")
                    .current_dir(self.dir())
                    .args(["--generate-certificate", "--load-privkey", "client-key.pem"])
                    .args(["--load-ca-certificate", "ca-cert.pem"])
                    .args(["--load-ca-privkey", "ca-key.pem", "--template"])
                    .arg(&tmpl)
                    .arg("--outfile")
                    .arg(&cert));
                cert
            }
        }
    }
}

/// What QEMU decided about one TLS client.
enum Decision {
    Allowed,
    /// Denied, with the DN QEMU printed in its error.
    Denied(String),
}

/// A lab QEMU (`-machine none`, `-incoming defer`) listening for a native
/// TLS migration with tls-authz, and how much of its stderr has been read.
struct Target {
    qemu: Qemu,
    /// The TLS migration listener's.
    port: u16,
    /// Bytes of the stderr log already looked at by `denial_on_stderr`.
    stderr_read: usize,
}

impl Target {
    async fn start(pki: &Path, identity: &str) -> Target {
        let mut opts = QemuOpts::default().as_incoming();
        opts.tls = Some(NativeTls {
            dir: pki.to_owned(),
            endpoint: TlsEndpoint::Server,
            authz_identity: Some(identity.to_owned()),
            priority: None,
        });
        let mut qemu = Qemu::spawn(opts).await.unwrap();
        qemu.set_native_tls_parameters(None).await.unwrap();
        let port = qemu.migrate_incoming_any_port().await.unwrap();
        Target {
            qemu,
            port,
            stderr_read: 0,
        }
    }

    /// Replaces the authz-simple object: QEMU looks tls-authz up at each use.
    async fn set_authz(&mut self, identity: &str) {
        self.qemu
            .cmd("object-del", json!({ "id": TLS_AUTHZ_ID }))
            .await
            .unwrap();
        self.qemu
            .cmd(
                "object-add",
                json!({"qom-type": "authz-simple", "id": TLS_AUTHZ_ID, "identity": identity}),
            )
            .await
            .unwrap();
    }

    /// Connects gnutls-cli with `cert` and awaits QEMU's verdict.
    async fn probe(&mut self, pki: &Path, cert: &Path) -> Decision {
        let mut client = tokio::process::Command::new("gnutls-cli")
            .current_dir(pki)
            .args(["--x509cafile", "ca-cert.pem"])
            .args(["--x509keyfile", "client-key.pem"])
            .arg("--x509certfile")
            .arg(cert)
            .args(["-p", &self.port.to_string(), "127.0.0.1"])
            .stdin(Stdio::piped()) // held open: EOF would end the session
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("gnutls-cli");
        let decision = self.await_decision().await;
        let _ = client.kill().await;
        decision
    }

    /// An allowed peer shows as the MIGRATION event `active`; a denial only
    /// as a line on QEMU's stderr, which nothing signals: between waits for
    /// events of at most POLL, the stderr log is read again, until STEP.
    async fn await_decision(&mut self) -> Decision {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Some(decision) = self.denial_on_stderr() {
                return decision;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "QEMU decided nothing in {STEP:?}; stderr:\n{}",
                    self.qemu.stderr_text()
                );
            }
            match self.qemu.qmp.next_event_within(POLL).await {
                Ok(Some(ev)) if ev.name == "MIGRATION" && ev.data["status"] == "active" => {
                    return Decision::Allowed
                }
                Ok(_) => {}
                Err(e) => panic!("QMP: {e}; stderr:\n{}", self.qemu.stderr_text()),
            }
        }
    }

    /// The first denial among the stderr lines not read yet; any other TLS
    /// error there fails the test.
    fn denial_on_stderr(&mut self) -> Option<Decision> {
        let text = self.qemu.stderr_text();
        // Whole lines only: QEMU may be half-way through writing one.
        while let Some(len) = text.get(self.stderr_read..)?.find('\n') {
            let line = &text[self.stderr_read..self.stderr_read + len];
            self.stderr_read += len + 1;
            if let Some(dn) = denied_dn(line) {
                return Some(Decision::Denied(dn.to_owned()));
            }
            assert!(!line.contains("TLS"), "unexpected TLS failure: {line}");
        }
        None
    }
}

/// "qemu-system-x86_64: TLS x509 authz check for DN is denied" -> DN.
fn denied_dn(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("TLS x509 authz check for ")?;
    rest.strip_suffix(" is denied")
}
