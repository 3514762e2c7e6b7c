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

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use miggate::creds::dn::subject_dn;
use serde_json::{json, Value};

const QEMU: &str = "qemu-system-x86_64";
const STEP: Duration = Duration::from_secs(30);

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

#[test]
fn qemu_authorizes_exactly_our_dn() {
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
    let mut qemu = Qemu::start(pki.dir());
    let port = qemu.listen();
    for (case, cert, ours) in &certs {
        qemu.set_authz(&wrong_variant(ours));
        match qemu.probe(port, &pki, cert) {
            Decision::Denied(reported) => assert_eq!(&reported, ours, "{}", case.label),
            Decision::Allowed => panic!("{}: QEMU allowed a wrong DN", case.label),
        }
    }
    drop(qemu);

    // Our exact string is allowed (one target each, started side by side).
    thread::scope(|s| {
        for (case, cert, ours) in &certs {
            let pki = &pki;
            s.spawn(move || {
                let mut qemu = Qemu::start(pki.dir());
                qemu.set_authz(ours);
                let port = qemu.listen();
                match qemu.probe(port, pki, cert) {
                    Decision::Allowed => eprintln!("QEMU allowed {:40} {ours}", case.label),
                    Decision::Denied(dn) => panic!("{}: QEMU denied; it computed {dn}", case.label),
                }
            });
        }
    });
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
        ok(QEMU, "--version"),
        "{QEMU} not found: apt-get install --no-install-recommends qemu-system-x86"
    );
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

/// Everything a QEMU says: QMP messages and stderr lines, in arrival order.
enum Said {
    Qmp(Value),
    Stderr(String),
}

/// A paused `-incoming defer` QEMU driven over QMP; killed on drop.
struct Qemu {
    child: Child,
    qmp: UnixStream,
    said: Receiver<Said>,
    events: VecDeque<Value>,
    stderr: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward<R: std::io::Read + Send + 'static>(r: R, tx: Sender<Said>, qmp: bool) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let msg = match qmp {
                true => Said::Qmp(serde_json::from_str(&line).expect("QMP sends JSON lines")),
                false => Said::Stderr(line),
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
}

impl Qemu {
    fn start(pki: &Path) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let creds = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            pki.display()
        );
        let mut child = Command::new(QEMU)
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
            .args(["-incoming", "defer", "-object", &creds, "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{QEMU}: {e}"));
        let (tx, said) = channel();
        forward(child.stderr.take().unwrap(), tx.clone(), false);
        let deadline = Instant::now() + STEP;
        let qmp = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("{QEMU} exited early: {status}");
                    }
                    thread::sleep(Duration::from_millis(20)); // wait for the socket file
                }
                Err(e) => panic!("QMP socket {sock:?}: {e}"),
            }
        };
        forward(qmp.try_clone().unwrap(), tx, true);
        let mut q = Qemu {
            child,
            qmp,
            said,
            events: VecDeque::new(),
            stderr: Vec::new(),
            _dir: dir,
        };
        q.next(Instant::now() + STEP); // greeting
        q.ok(json!({"execute": "qmp_capabilities"}));
        q.ok(json!({"execute": "migrate-set-capabilities",
                    "arguments": miggate_lab::qemu::capabilities(&[("events", true)])}));
        q
    }

    fn next(&mut self, deadline: Instant) -> Said {
        let left = deadline.saturating_duration_since(Instant::now());
        self.said
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("QEMU said nothing ({e}); stderr so far: {:?}", self.stderr))
    }

    fn cmd(&mut self, cmd: Value) -> Value {
        writeln!(self.qmp, "{cmd}").unwrap();
        let deadline = Instant::now() + STEP;
        loop {
            match self.next(deadline) {
                Said::Qmp(m) if m.get("event").is_some() => self.events.push_back(m),
                Said::Qmp(m) => return m,
                Said::Stderr(line) => self.stderr.push(line),
            }
        }
    }

    fn ok(&mut self, cmd: Value) -> Value {
        let reply = self.cmd(cmd.clone());
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{cmd} -> {reply}"))
    }

    /// Replaces authz-simple `auth0`: QEMU looks tls-authz up at each use.
    fn set_authz(&mut self, identity: &str) {
        self.cmd(json!({"execute": "object-del", "arguments": {"id": "auth0"}}));
        self.ok(json!({"execute": "object-add", "arguments":
            {"qom-type": "authz-simple", "id": "auth0", "identity": identity}}));
    }

    /// Starts the TLS incoming listener on an ephemeral port.
    fn listen(&mut self) -> u16 {
        self.ok(json!({"execute": "migrate-set-parameters",
                       "arguments": {"tls-creds": "tls0", "tls-authz": "auth0"}}));
        self.ok(json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}}));
        let info = self.ok(json!({"execute": "query-migrate"}));
        let port = &info["socket-address"][0]["port"];
        port.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| port.to_string())
            .parse()
            .unwrap_or_else(|_| panic!("no port in {info}"))
    }

    /// Connects with `cert` and waits for QEMU's verdict.
    fn probe(&mut self, port: u16, pki: &Pki, cert: &Path) -> Decision {
        let mut client = Command::new("gnutls-cli")
            .current_dir(pki.dir())
            .args([
                "--x509cafile",
                "ca-cert.pem",
                "--x509keyfile",
                "client-key.pem",
            ])
            .arg("--x509certfile")
            .arg(cert)
            .args(["-p", &port.to_string(), "127.0.0.1"])
            .stdin(Stdio::piped()) // held open: EOF would end the session
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnutls-cli");
        let decision = self.await_decision();
        let _ = client.kill();
        let _ = client.wait();
        decision
    }

    fn await_decision(&mut self) -> Decision {
        let deadline = Instant::now() + STEP;
        loop {
            while let Some(ev) = self.events.pop_front() {
                if ev["event"] == "MIGRATION" && ev["data"]["status"] == "active" {
                    return Decision::Allowed;
                }
            }
            match self.next(deadline) {
                Said::Qmp(m) => self.events.push_back(m),
                Said::Stderr(line) => {
                    if let Some(dn) = denied_dn(&line) {
                        return Decision::Denied(dn.to_owned());
                    }
                    assert!(!line.contains("TLS"), "unexpected TLS failure: {line}");
                    self.stderr.push(line);
                }
            }
        }
    }
}

/// "qemu-system-x86_64: TLS x509 authz check for DN is denied" -> DN.
fn denied_dn(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("TLS x509 authz check for ")?;
    rest.strip_suffix(" is denied")
}
