//! QEMU migration stream sniffing: what a connection is, from its first bytes.
//!
//! The sniffer only *looks*: the caller keeps the bytes it read and replays them
//! to the target QEMU, so nothing here consumes or rewrites the stream.
//!
//! # Main channel (QEMU 7.2, same in 8.x/9.x)
//!
//! Written by `qemu_savevm_state_header()` (migration/savevm.c): the file header,
//! then, if the migration property `send-configuration` is on (the default),
//! `QEMU_VM_CONFIGURATION` and `vmstate_configuration` saved by
//! `vmstate_save_state()`, with no section id and no footer. Subsections are written by
//! `vmstate_subsection_save()` (migration/vmstate.c) in the order of the
//! `.subsections` array, each only if its `needed()` returns true.
//!
//! ```text
//! off  size  field
//!   0   4    be32 QEMU_VM_FILE_MAGIC   0x5145564d "QEVM"
//!   4   4    be32 QEMU_VM_FILE_VERSION 3
//!   8   1    0x07 QEMU_VM_CONFIGURATION          (absent if send-configuration=off)
//!   9   4    be32 len                            } vmstate_configuration fields:
//!  13   len  machine type name, no NUL           } "pc-i440fx-7.2"
//!       ...  subsections, each:
//!              1   0x05 QEMU_VM_SUBSECTION
//!              1   u8 name length n
//!              n   name, e.g. "configuration/uuid"
//!              4   be32 version_id (1 for all three below)
//!              ... fields of the subsection
//!       1    next section type: 0x01 SECTION_START, 0x08 COMMAND, ...
//!
//! subsections of "configuration", in this order:
//!   configuration/target-page-bits  be32 bits             needed: TARGET_PAGE_BITS >
//!                                                         TARGET_PAGE_BITS_MIN (never on x86)
//!   configuration/capabilities      be32 count, count x   needed: a validated capability
//!                                   (u8 len, name)        is on (x-ignore-shared; later
//!                                                         QEMU adds mapped-ram)
//!   configuration/uuid              16 bytes              needed: -uuid given AND the
//!                                                         validate-uuid capability
//! ```
//!
//! The loader (`vmstate_subsection_load()`) keeps reading subsections while the
//! next byte is 0x05 and its name starts with "configuration"; so "no uuid" is
//! only known once the byte after the last subsection is seen.
//!
//! Captured from QEMU 7.2 with `-uuid` and validate-uuid
//! (crates/lab/fixtures/streams/qemu72-main-uuid.bin):
//!
//! ```text
//! 51 45 56 4d 00 00 00 03 07 00 00 00 0d "pc-i440fx-7.2"
//! 05 12 "configuration/uuid" 00 00 00 01 <16 uuid bytes> 01 ...(SECTION_START "ram")
//! ```
//!
//! # Multifd channel
//!
//! Each multifd socket starts with `MultiFDInit_t` (migration/multifd.c,
//! `multifd_send_initial_packet()`), 64 bytes, packed:
//!
//! ```text
//! off  size  field
//!   0   4    be32 magic   MULTIFD_MAGIC 0x11223344
//!   4   4    be32 version MULTIFD_VERSION 1
//!   8  16    uuid         qemu_uuid (all zero when the source has no -uuid)
//!  24   1    id           channel number
//!  25   7    unused1      reserved
//!  32  32    unused2[4]   reserved
//! ```
//!
//! The target (`multifd_recv_initial_packet()`) refuses a uuid different from
//! its own, so multifd channels always carry the VM identity, unlike the main
//! channel.
//!
//! # Channel order
//!
//! Captured from 7.2: the source connects the main channel first, but the
//! multifd init packets often reach the wire *before* the main channel's first
//! byte. A 7.2 target takes the first accepted connection as the main channel
//! (`migration_ioc_process_incoming()`; 8.0+ peeks at the magic instead, on a
//! plain socket only), so a relay must sniff each connection on its own and
//! connect the main channel to a 7.2 target first. With TLS every version
//! takes the first completed handshake as main: see `gate::source`.
//!
//! # Postcopy preempt channel
//!
//! It carries no magic and no VM identity in 7.2 and 10.0 (later QEMU
//! gives it `POSTCOPY_MAGIC`, reported as [`SniffError::Unsupported`]),
//! and it is silent until the target faults on a page during postcopy.
//! Captured through a plain relay (paused guest, postcopy started after
//! 1.5 s): 7.2 connects it at the start of the migration, right after the
//! main channel and before the main channel's first byte, and sends 8
//! bytes (`RAM_SAVE_FLAG_EOS`) when postcopy starts; 10.0 connects it
//! only when postcopy starts and sent nothing at all. Either target QEMU
//! takes the second connection as the preempt channel. So it is never
//! sniffed: it is recognised by the main channel it belongs to, whose
//! stream advises postcopy ([`postcopy_advised`]), and a miggate source
//! declares it to the target gateway by joining that main channel
//! (see `wire::frames`).

use std::fmt::Write as _;

use uuid::Uuid;

pub const QEVM_MAGIC: u32 = 0x5145_564d;
pub const QEVM_VERSION: u32 = 3;
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION` in migration/multifd.c (1 in every version looked at, through 9.x).
pub const MULTIFD_VERSION: u32 = 1;
/// `sizeof(MultiFDInit_t)`.
pub const MULTIFD_INIT_LEN: usize = 64;

/// Upper bound on bytes the sniffer may need; the caller stops reading there.
///
/// The largest main-channel prefix the sniffer accepts is bounded by the limits
/// below (machine name <= 256, <= 32 capabilities of <= 64 bytes each, each known
/// subsection at most once): [`WORST_CASE`] = 2686 bytes. 4 KiB covers it with
/// margin and is one page of buffering per pending connection. Real streams need
/// far less: 27 bytes (no uuid) to 66 bytes (uuid) for QEMU 7.2 "pc", 64 for multifd.
pub const SNIFF_MAX: usize = 4096;

/// Longest machine type name accepted. QEMU's are short ("pc-q35-9.2",
/// "pseries-9.1"); the field is a be32 so a bound is needed against garbage.
const MAX_MACHINE_NAME: usize = 256;
/// QEMU has ~25 capabilities in total and sends only the validated ones.
const MAX_CAPS: u32 = 32;
/// Capability names are like "x-ignore-shared" (15 bytes).
const MAX_CAP_NAME: usize = 64;

// Section type bytes, migration/savevm.h.
const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_SUBSECTION: u8 = 0x05;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const QEMU_VM_COMMAND: u8 = 0x08;
/// `MIG_CMD_POSTCOPY_ADVISE`, migration/savevm.c: the source may switch
/// to postcopy, so the target must be ready for it.
const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// `MIG_CMD_RECV_BITMAP`: the first thing a resumed postcopy migration
/// sends (`qemu_savevm_send_recv_bitmap()` per RAM block), observed on 7.2
/// and 10.0 as `08 00 0a | be16 len | u8 n | block name`.
const MIG_CMD_RECV_BITMAP: u16 = 0x0a;
/// Commands looked through after the header: open return path, ping and
/// the advise come first (`migration_thread()`), in that order.
const MAX_LEADING_COMMANDS: usize = 8;

/// `QEMU_VM_FILE_VERSION_COMPAT`: recognised only to say why it is refused.
const QEVM_VERSION_COMPAT: u32 = 2;
/// Magic of the postcopy-preempt channel in recent QEMU patches
/// (`POSTCOPY_MAGIC`, migration/postcopy-ram.h); recognised to say so.
const POSTCOPY_MAGIC: u32 = 0x5566_7788;

const CONFIGURATION: &[u8] = b"configuration";
const SUB_TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
const SUB_CAPABILITIES: &[u8] = b"configuration/capabilities";
const SUB_UUID: &[u8] = b"configuration/uuid";

/// Bytes of one subsection header: type byte, name length byte, name, be32 version.
const fn sub_header(name_len: usize) -> usize {
    1 + 1 + name_len + 4
}

/// Most bytes [`sniff`] can need before it answers, given the limits above:
/// header, configuration fields, target-page-bits and the largest capabilities
/// subsection, then the header of an unknown subsection (the costliest end).
pub const WORST_CASE: usize = 8
    + 1
    + 4
    + MAX_MACHINE_NAME
    + sub_header(SUB_TARGET_PAGE_BITS.len())
    + 4
    + sub_header(SUB_CAPABILITIES.len())
    + 4
    + MAX_CAPS as usize * (1 + MAX_CAP_NAME)
    + sub_header(u8::MAX as usize);
const _: () = assert!(WORST_CASE <= SNIFF_MAX);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKind {
    /// The main channel. `uuid` is the `configuration/uuid` subsection if the source sent it
    /// (QEMU sends it only with the validate-uuid capability and `-uuid`); `machine` the
    /// configuration section's machine type name if a configuration section is present.
    Main {
        uuid: Option<Uuid>,
        machine: Option<String>,
    },
    /// A multifd channel's init packet. `uuid` is nil when the source QEMU has no `-uuid`.
    Multifd { uuid: Uuid, channel: u8 },
    /// The postcopy preempt channel: never sniffed (it has no header), but
    /// known from the main channel it joined; its VM is that channel's.
    Preempt,
    /// A main channel resuming a paused postcopy migration: it starts
    /// with the recovery's commands ([`resume_stream`]), no header; its VM
    /// is the cut main channel's it resumes.
    Resumed,
    /// An NBD channel (storage migration): declared by the source
    /// gateway's hello, named by the export its client asks for
    /// ([`super::nbd`]). No VM UUID: the ticket or the route says whose.
    Nbd { export: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    /// More bytes are needed to decide (caller reads more, up to SNIFF_MAX, under a timeout).
    #[error("incomplete")]
    Incomplete,
    /// Neither a QEVM header nor a multifd init packet.
    #[error("not a QEMU migration stream (starts with {head}){hint}")]
    NotQemu {
        /// Hex of the first bytes, e.g. "16 03 01 02 00".
        head: String,
        /// A guess at what it is instead, e.g. "; looks like a TLS handshake", or "".
        hint: &'static str,
    },
    /// A QEMU magic, but what follows is not what QEMU writes (or would accept).
    #[error("malformed QEMU migration stream at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    /// Valid-looking, but a version or layout this sniffer does not know.
    #[error("unsupported QEMU migration stream at byte {offset}: {reason}")]
    Unsupported { offset: usize, reason: String },
}

/// Recognise a QEMU migration connection from `prefix`, the bytes received so far.
///
/// Returns [`SniffError::Incomplete`] until enough bytes are there; never reads
/// past what it needs, so any longer prefix gives the same answer.
pub fn sniff(prefix: &[u8]) -> Result<StreamKind, SniffError> {
    let magic_len = prefix.len().min(4);
    let known = [QEVM_MAGIC, MULTIFD_MAGIC, POSTCOPY_MAGIC];
    // Reject on the first wrong byte: a TLS or HTTP client gets its answer at once.
    if !known
        .iter()
        .any(|m| m.to_be_bytes().starts_with(&prefix[..magic_len]))
    {
        return Err(not_qemu(prefix));
    }
    let mut c = Cursor {
        buf: prefix,
        pos: 0,
    };
    match c.be32()? {
        QEVM_MAGIC => sniff_main(&mut c).map(|(kind, _)| kind),
        MULTIFD_MAGIC => sniff_multifd(&mut c),
        _ => Err(unsupported(
            0,
            "postcopy-preempt channel (magic 55 66 77 88) is not handled".into(),
        )),
    }
}

/// The main channel after its magic; also returns where what follows the
/// header and configuration starts, as far as the sniffer read.
/// Whether a main channel's stream advises postcopy: the commands that
/// follow the header and configuration (`08 | be16 cmd | be16 len | data`)
/// include `MIG_CMD_POSTCOPY_ADVISE`, sent before any RAM when the
/// `postcopy-ram` capability is on. `None`: more bytes are needed;
/// anything that is not a main stream, or unexpected, is `Some(false)`.
pub fn postcopy_advised(stream: &[u8]) -> Option<bool> {
    // Not QEVM from its first byte: no need to wait for a whole magic.
    if !QEVM_MAGIC
        .to_be_bytes()
        .starts_with(&stream[..stream.len().min(4)])
    {
        return Some(false);
    }
    let mut c = Cursor {
        buf: stream,
        pos: 0,
    };
    let end = match c.be32().and_then(|m| match m {
        QEVM_MAGIC => sniff_main(&mut c),
        _ => Err(malformed(0, String::new())),
    }) {
        Ok((_, end)) => end,
        Err(SniffError::Incomplete) => return None,
        Err(_) => return Some(false),
    };
    let mut c = Cursor {
        buf: stream,
        pos: end,
    };
    for _ in 0..MAX_LEADING_COMMANDS {
        let command = (|| -> Result<Option<u16>, SniffError> {
            if c.u8()? != QEMU_VM_COMMAND {
                return Ok(None);
            }
            let cmd = c.be16()?;
            let len = c.be16()?;
            c.take(len as usize)?;
            Ok(Some(cmd))
        })();
        match command {
            Err(_) => return None,
            Ok(None) => return Some(false),
            Ok(Some(MIG_CMD_POSTCOPY_ADVISE)) => return Some(true),
            Ok(Some(_)) => {}
        }
    }
    Some(false)
}

/// Whether a connection's first bytes are a resumed postcopy migration's
/// main channel: a `MIG_CMD_RECV_BITMAP` command naming a RAM block.
/// `None`: more bytes are needed.
pub fn resume_stream(prefix: &[u8]) -> Option<bool> {
    let mut c = Cursor {
        buf: prefix,
        pos: 0,
    };
    let parsed = (|| -> Result<bool, SniffError> {
        if c.u8()? != QEMU_VM_COMMAND || c.be16()? != MIG_CMD_RECV_BITMAP {
            return Ok(false);
        }
        let len = c.be16()? as usize;
        let n = c.u8()? as usize;
        // The command's data is the name's length byte and the name.
        Ok(len == n + 1 && n > 0)
    })();
    parsed.ok()
}

fn sniff_main(c: &mut Cursor) -> Result<(StreamKind, usize), SniffError> {
    let at = c.pos;
    match c.be32()? {
        QEVM_VERSION => {}
        QEVM_VERSION_COMPAT => return Err(unsupported(
            at,
            "QEVM version 2 is obsolete; QEMU refuses it too (\"SaveVM v2 format is obsolete\")"
                .into(),
        )),
        v => {
            return Err(unsupported(
                at,
                format!("unknown QEVM version {v} (expected 3)"),
            ))
        }
    }
    let at = c.pos;
    match c.u8()? {
        QEMU_VM_CONFIGURATION => sniff_configuration(c),
        t if is_section_start(t) => Ok((
            StreamKind::Main {
                uuid: None,
                machine: None,
            },
            at,
        )),
        t => Err(malformed(
            at,
            format!("byte 0x{t:02x} after the QEVM header is neither a configuration (0x07) nor a section start"),
        )),
    }
}

/// First byte of what may follow the header or the configuration section:
/// setup sections (`qemu_savevm_state_setup()`), commands (return path,
/// postcopy advise), or EOF for an empty snapshot.
fn is_section_start(t: u8) -> bool {
    matches!(
        t,
        QEMU_VM_EOF | QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL | QEMU_VM_COMMAND
    )
}

fn sniff_configuration(c: &mut Cursor) -> Result<(StreamKind, usize), SniffError> {
    let at = c.pos;
    let len = c.be32()? as usize;
    if len > MAX_MACHINE_NAME {
        return Err(malformed(
            at,
            format!("machine type name length {len} exceeds {MAX_MACHINE_NAME}"),
        ));
    }
    let at = c.pos;
    let name = c.take(len)?;
    if !name.iter().all(u8::is_ascii_graphic) {
        return Err(malformed(
            at,
            format!(
                "machine type name \"{}\" is not printable ASCII",
                name.escape_ascii()
            ),
        ));
    }
    // Printable ASCII, so the conversion is lossless.
    let machine = Some(String::from_utf8_lossy(name).into_owned());

    let (mut seen_tpb, mut seen_caps) = (false, false);
    loop {
        let at = c.pos;
        let t = c.u8()?;
        if t != QEMU_VM_SUBSECTION {
            if is_section_start(t) {
                return Ok((
                    StreamKind::Main {
                        uuid: None,
                        machine,
                    },
                    at,
                ));
            }
            return Err(malformed(
                at,
                format!("byte 0x{t:02x} after the configuration section is not a section start"),
            ));
        }
        let n = c.u8()? as usize;
        let sub = c.take(n)?;
        // vmstate_subsection_load() ends the list on a name not under "configuration";
        // the 0x05 then reaches the top level, where QEMU rejects it.
        if n <= CONFIGURATION.len() || !sub.starts_with(CONFIGURATION) {
            return Err(malformed(
                at,
                format!(
                    "subsection \"{}\" does not belong to the configuration section",
                    sub.escape_ascii()
                ),
            ));
        }
        let version = c.be32()?;
        let known = [SUB_TARGET_PAGE_BITS, SUB_CAPABILITIES, SUB_UUID];
        if !known.contains(&sub) {
            // Its fields have unknown length, so the uuid (if any) cannot be found.
            return Err(unsupported(
                at,
                format!(
                    "unknown configuration subsection \"{}\" (version {version}) before configuration/uuid",
                    sub.escape_ascii()
                ),
            ));
        }
        if version != 1 {
            return Err(unsupported(
                at,
                format!(
                    "subsection \"{}\" version {version} (known: 1)",
                    sub.escape_ascii()
                ),
            ));
        }
        let dup = match sub {
            s if s == SUB_TARGET_PAGE_BITS => std::mem::replace(&mut seen_tpb, true),
            s if s == SUB_CAPABILITIES => std::mem::replace(&mut seen_caps, true),
            _ => false,
        };
        if dup {
            // Also keeps the worst case within SNIFF_MAX.
            return Err(malformed(
                at,
                format!("duplicate subsection \"{}\"", sub.escape_ascii()),
            ));
        }
        if sub == SUB_TARGET_PAGE_BITS {
            c.be32()?;
        } else if sub == SUB_CAPABILITIES {
            skip_capabilities(c)?;
        } else {
            let uuid = Uuid::from_bytes(c.array()?);
            // uuid is the last subsection QEMU knows; nothing after it matters here.
            return Ok((
                StreamKind::Main {
                    uuid: Some(uuid),
                    machine,
                },
                c.pos,
            ));
        }
    }
}

/// `VMSTATE_VARRAY_UINT32_ALLOC(capabilities, ..., vmstate_info_capability)`:
/// be32 count, then `put_capability()` per entry: u8 length, name.
fn skip_capabilities(c: &mut Cursor) -> Result<(), SniffError> {
    let at = c.pos;
    let count = c.be32()?;
    if count > MAX_CAPS {
        return Err(malformed(
            at,
            format!("capability count {count} exceeds {MAX_CAPS}"),
        ));
    }
    for _ in 0..count {
        let at = c.pos;
        let len = c.u8()? as usize;
        if len > MAX_CAP_NAME {
            return Err(malformed(
                at,
                format!("capability name length {len} exceeds {MAX_CAP_NAME}"),
            ));
        }
        c.take(len)?;
    }
    Ok(())
}

fn sniff_multifd(c: &mut Cursor) -> Result<StreamKind, SniffError> {
    let at = c.pos;
    let version = c.be32()?;
    if version != MULTIFD_VERSION {
        return Err(unsupported(
            at,
            format!("multifd init packet version {version} (known: {MULTIFD_VERSION})"),
        ));
    }
    let uuid = Uuid::from_bytes(c.array()?);
    let channel = c.u8()?;
    // Wait for the whole packet: QEMU sends it in one write, and a short one
    // would be refused by the target anyway. Reserved bytes are not checked,
    // as QEMU does not check them either.
    c.take(MULTIFD_INIT_LEN - c.pos)?;
    Ok(StreamKind::Multifd { uuid, channel })
}

fn not_qemu(prefix: &[u8]) -> SniffError {
    let mut head = String::new();
    for (i, b) in prefix.iter().take(8).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(head, "{sep}{b:02x}");
    }
    if prefix.len() > 8 {
        head.push_str(" ...");
    }
    let hint = if prefix.first() == Some(&0x16) {
        // TLS record type 22 (handshake): a TLS client where plain QEMU was expected.
        "; looks like a TLS handshake"
    } else if [
        &b"GET "[..],
        b"POST",
        b"PUT ",
        b"HEAD",
        b"CONN",
        b"HTTP",
        b"OPTI",
    ]
    .iter()
    .any(|m| prefix.len() >= 4 && prefix.starts_with(m))
    {
        "; looks like HTTP"
    } else if prefix.starts_with(b"SSH-") {
        "; looks like SSH"
    } else {
        ""
    };
    SniffError::NotQemu { head, hint }
}

/// Reads forward through the prefix; running out is [`SniffError::Incomplete`].
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniffError> {
        let end = self.pos.checked_add(n).ok_or(SniffError::Incomplete)?;
        let s = self.buf.get(self.pos..end).ok_or(SniffError::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SniffError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, SniffError> {
        Ok(self.take(1)?[0])
    }

    fn be16(&mut self) -> Result<u16, SniffError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn be32(&mut self) -> Result<u32, SniffError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
}

fn malformed(offset: usize, reason: String) -> SniffError {
    SniffError::Malformed { offset, reason }
}

fn unsupported(offset: usize, reason: String) -> SniffError {
    SniffError::Unsupported { offset, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const VM_UUID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    const MACHINE: &str = "pc-i440fx-7.2";

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("crates/lab/fixtures/streams")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn vm_uuid() -> Uuid {
        Uuid::parse_str(VM_UUID).unwrap()
    }

    fn main(uuid: Option<Uuid>, machine: Option<&str>) -> StreamKind {
        StreamKind::Main {
            uuid,
            machine: machine.map(str::to_owned),
        }
    }

    /// linkerd's habit: every strict prefix shorter than what is needed is
    /// Incomplete, every longer one gives the full answer. Returns bytes needed.
    fn check_all_prefixes(bytes: &[u8]) -> usize {
        let full = sniff(bytes);
        assert_ne!(full, Err(SniffError::Incomplete), "whole input incomplete");
        let needed = (0..=bytes.len())
            .find(|&n| sniff(&bytes[..n]) != Err(SniffError::Incomplete))
            .unwrap();
        for n in 0..needed {
            assert_eq!(
                sniff(&bytes[..n]),
                Err(SniffError::Incomplete),
                "prefix {n}"
            );
        }
        for n in needed..=bytes.len() {
            assert_eq!(sniff(&bytes[..n]), full, "prefix {n}");
        }
        assert!(needed <= SNIFF_MAX);
        needed
    }

    #[test]
    fn qemu72_fixtures() {
        let mf = |uuid, channel| StreamKind::Multifd { uuid, channel };
        // (fixture, expected, bytes needed)
        let cases = [
            ("qemu72-main-plain.bin", main(None, Some(MACHINE)), 27),
            ("qemu72-main-no-config.bin", main(None, None), 9),
            (
                "qemu72-main-uuid-no-validate.bin",
                main(None, Some(MACHINE)),
                27,
            ),
            (
                "qemu72-main-validate-no-uuid.bin",
                main(None, Some(MACHINE)),
                27,
            ),
            (
                "qemu72-main-uuid.bin",
                main(Some(vm_uuid()), Some(MACHINE)),
                66,
            ),
            (
                "qemu72-main-uuid-ignore-shared.bin",
                main(Some(vm_uuid()), Some(MACHINE)),
                118,
            ),
            (
                "qemu72-multifd-uuid-main.bin",
                main(Some(vm_uuid()), Some(MACHINE)),
                66,
            ),
            ("qemu72-multifd-uuid-chan0.bin", mf(vm_uuid(), 0), 64),
            ("qemu72-multifd-uuid-chan1.bin", mf(vm_uuid(), 1), 64),
            (
                "qemu72-multifd-no-uuid-main.bin",
                main(None, Some(MACHINE)),
                27,
            ),
            ("qemu72-multifd-no-uuid-chan0.bin", mf(Uuid::nil(), 0), 64),
            ("qemu72-multifd-no-uuid-chan1.bin", mf(Uuid::nil(), 1), 64),
        ];
        for (name, want, needed) in cases {
            let bytes = fixture(name);
            assert_eq!(sniff(&bytes), Ok(want), "{name}");
            assert_eq!(check_all_prefixes(&bytes), needed, "{name}");
        }
    }

    /// Hand-built main stream: header, configuration with the given subsections, then `tail`.
    fn stream(machine: &[u8], subs: &[(&[u8], u32, &[u8])], tail: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(QEVM_MAGIC.to_be_bytes());
        v.extend(QEVM_VERSION.to_be_bytes());
        v.push(QEMU_VM_CONFIGURATION);
        v.extend((machine.len() as u32).to_be_bytes());
        v.extend(machine);
        for (name, version, body) in subs {
            v.push(QEMU_VM_SUBSECTION);
            v.push(name.len() as u8);
            v.extend(*name);
            v.extend(version.to_be_bytes());
            v.extend(*body);
        }
        v.extend(tail);
        v
    }

    fn caps(names: &[&[u8]]) -> Vec<u8> {
        let mut v = (names.len() as u32).to_be_bytes().to_vec();
        for n in names {
            v.push(n.len() as u8);
            v.extend(*n);
        }
        v
    }

    fn err_kind(r: Result<StreamKind, SniffError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(SniffError::Incomplete) => "incomplete",
            Err(SniffError::NotQemu { .. }) => "not-qemu",
            Err(SniffError::Malformed { .. }) => "malformed",
            Err(SniffError::Unsupported { .. }) => "unsupported",
        }
    }

    #[test]
    fn all_three_subsections_like_non_x86_qemu() {
        // target-page-bits is only sent where the page size is variable (e.g. Arm).
        let caps = caps(&[b"x-ignore-shared", b"mapped-ram"]);
        let u = vm_uuid();
        let s = stream(
            b"virt-9.2",
            &[
                (SUB_TARGET_PAGE_BITS, 1, &12u32.to_be_bytes()),
                (SUB_CAPABILITIES, 1, &caps),
                (SUB_UUID, 1, u.as_bytes()),
            ],
            &[QEMU_VM_SECTION_START],
        );
        assert_eq!(sniff(&s), Ok(main(Some(u), Some("virt-9.2"))));
        assert_eq!(check_all_prefixes(&s), s.len() - 1);
    }

    /// The leading commands of real main streams (captured from the
    /// probe in the module comment): open return path, ping 1, advise.
    #[test]
    fn postcopy_advise_after_the_configuration() {
        let leading: &[u8] = &[
            0x08, 0, 1, 0, 0, 0x08, 0, 2, 0, 4, 0, 0, 0, 1, 0x08, 0, 3, 0, 16,
        ];
        let advise_data = [0u8; 16];
        let mut advised = stream(b"pc-i440fx-7.2", &[(SUB_UUID, 1, &[7; 16])], leading);
        advised.extend_from_slice(&advise_data);
        assert_eq!(postcopy_advised(&advised), Some(true));
        // Every shorter prefix waits: the advise is not there yet.
        for n in 0..advised.len() {
            assert_eq!(postcopy_advised(&advised[..n]), None, "prefix {n}");
        }
        // Without -uuid: the configuration ends at the first command.
        let mut no_uuid = stream(b"pc-i440fx-10.0", &[], leading);
        no_uuid.extend_from_slice(&advise_data);
        assert_eq!(postcopy_advised(&no_uuid), Some(true));
        // Return path only, then RAM: not postcopy.
        let rp_only = stream(b"pc", &[], &[0x08, 0, 1, 0, 0, 0x01]);
        assert_eq!(postcopy_advised(&rp_only), Some(false));
        assert_eq!(postcopy_advised(&stream(b"pc", &[], &[0x01])), Some(false));
        // Not a main stream at all.
        assert_eq!(postcopy_advised(&[0x11, 0x22, 0x33, 0x44]), Some(false));
        assert_eq!(postcopy_advised(b"QEV"), None);
        // Found by fuzzing (fuzz/regressions/qemu_stream/): a prefix that
        // is already not QEVM (here a TLS record) is not "need more".
        assert_eq!(postcopy_advised(&[0x16, 0x03, 0x02]), Some(false));
        assert_eq!(postcopy_advised(&[0x11]), Some(false));
    }

    /// Captured from 7.2 and 10.0 resuming after a cut.
    #[test]
    fn a_resumed_main_channel_starts_with_recv_bitmap() {
        let resumed: &[u8] = &[
            0x08, 0, 0x0a, 0, 5, 4, b'r', b'a', b'm', b'0', 0x08, 0, 0x0a, 0, 0x15,
        ];
        assert_eq!(resume_stream(resumed), Some(true));
        for n in 0..6 {
            assert_eq!(resume_stream(&resumed[..n]), None, "prefix {n}");
        }
        assert_eq!(resume_stream(b"QEVM"), Some(false));
        assert_eq!(resume_stream(&[0, 0, 0, 0, 0, 0, 0, 0x10]), Some(false));
        assert_eq!(resume_stream(&[0x08, 0, 0x0a, 0, 9, 4]), Some(false));
    }

    #[test]
    fn uuid_absent_needs_next_byte() {
        let s = stream(MACHINE.as_bytes(), &[], &[QEMU_VM_COMMAND]);
        assert_eq!(check_all_prefixes(&s), s.len());
        assert_eq!(sniff(&s), Ok(main(None, Some(MACHINE))));
    }

    #[test]
    fn unknown_subsection_before_uuid_is_unsupported() {
        let u = vm_uuid();
        let s = stream(
            MACHINE.as_bytes(),
            &[
                (b"configuration/new-thing", 1, &[1, 2, 3]),
                (SUB_UUID, 1, u.as_bytes()),
            ],
            &[],
        );
        let e = sniff(&s).unwrap_err();
        assert!(
            matches!(e, SniffError::Unsupported { offset: 26, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("configuration/new-thing"), "{e}");
        check_all_prefixes(&s);
    }

    #[test]
    fn unknown_subsection_after_uuid_is_ignored() {
        let u = vm_uuid();
        let s = stream(
            MACHINE.as_bytes(),
            &[(SUB_UUID, 1, u.as_bytes()), (b"configuration/new", 7, &[])],
            &[],
        );
        assert_eq!(sniff(&s), Ok(main(Some(u), Some(MACHINE))));
    }

    #[test]
    fn hostile_inputs() {
        let tls = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let e = sniff(&tls).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a QEMU migration stream (starts with 16 03 01 02 00 01 00 01 ...); \
             looks like a TLS handshake"
        );
        // One byte is enough to refuse.
        assert_eq!(err_kind(sniff(&[0x16])), "not-qemu");

        let http = sniff(b"GET / HTTP/1.1\r\n").unwrap_err().to_string();
        assert!(
            http.contains("47 45 54 20") && http.ends_with("looks like HTTP"),
            "{http}"
        );
        assert_eq!(err_kind(sniff(&[0; 64])), "not-qemu");
        assert_eq!(err_kind(sniff(b"QEVX")), "not-qemu");

        // Version: obsolete 2, unknown 4.
        let mut v2 = QEVM_MAGIC.to_be_bytes().to_vec();
        v2.extend(2u32.to_be_bytes());
        assert_eq!(err_kind(sniff(&v2)), "unsupported");
        let mut v4 = QEVM_MAGIC.to_be_bytes().to_vec();
        v4.extend(4u32.to_be_bytes());
        assert!(sniff(&v4).unwrap_err().to_string().contains("version 4"));

        // Huge declared machine-name length: refused before waiting for it.
        let mut huge = stream(b"", &[], &[]);
        huge[9..13].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            sniff(&huge),
            Err(SniffError::Malformed { offset: 9, .. })
        ));
        let binary = stream(b"pc\x00\xff", &[], &[QEMU_VM_SECTION_START]);
        assert_eq!(err_kind(sniff(&binary)), "malformed");

        // Truncated uuid stays incomplete; it is the caller's timeout that ends it.
        let full = stream(
            MACHINE.as_bytes(),
            &[(SUB_UUID, 1, vm_uuid().as_bytes())],
            &[],
        );
        assert_eq!(sniff(&full[..full.len() - 3]), Err(SniffError::Incomplete));

        // Subsection versions and counts beyond what is known.
        let uuid_v2 = stream(MACHINE.as_bytes(), &[(SUB_UUID, 2, &[0; 16])], &[]);
        assert_eq!(err_kind(sniff(&uuid_v2)), "unsupported");
        let many = stream(
            MACHINE.as_bytes(),
            &[(SUB_CAPABILITIES, 1, &[0, 0, 1, 0])],
            &[],
        );
        assert_eq!(err_kind(sniff(&many)), "malformed");
        let long_cap = stream(
            MACHINE.as_bytes(),
            &[(SUB_CAPABILITIES, 1, &[0, 0, 0, 1, 200])],
            &[],
        );
        assert_eq!(err_kind(sniff(&long_cap)), "malformed");
        let dup = caps(&[]);
        let dup = stream(
            MACHINE.as_bytes(),
            &[(SUB_CAPABILITIES, 1, &dup), (SUB_CAPABILITIES, 1, &dup)],
            &[],
        );
        assert_eq!(err_kind(sniff(&dup)), "malformed");

        // A subsection that is not configuration's; garbage after the header.
        let foreign = stream(MACHINE.as_bytes(), &[(b"ram/x", 1, &[])], &[]);
        assert_eq!(err_kind(sniff(&foreign)), "malformed");
        let short = stream(MACHINE.as_bytes(), &[(CONFIGURATION, 1, &[])], &[]);
        assert_eq!(err_kind(sniff(&short)), "malformed");
        let junk = stream(MACHINE.as_bytes(), &[], &[0x7f]);
        assert_eq!(err_kind(sniff(&junk)), "malformed");
        let mut no_cfg_junk = QEVM_MAGIC.to_be_bytes().to_vec();
        no_cfg_junk.extend(QEVM_VERSION.to_be_bytes());
        no_cfg_junk.push(0x42);
        assert_eq!(err_kind(sniff(&no_cfg_junk)), "malformed");

        // Multifd: wrong version, and short packets.
        let mut mf = fixture("qemu72-multifd-uuid-chan1.bin");
        assert_eq!(
            sniff(&mf[..MULTIFD_INIT_LEN - 1]),
            Err(SniffError::Incomplete)
        );
        assert_eq!(sniff(&mf[..20]), Err(SniffError::Incomplete));
        mf[7] = 2;
        assert_eq!(err_kind(sniff(&mf)), "unsupported");

        // Postcopy-preempt magic: named, not mistaken for garbage.
        let pc = sniff(&POSTCOPY_MAGIC.to_be_bytes())
            .unwrap_err()
            .to_string();
        assert!(pc.contains("postcopy"), "{pc}");
    }

    #[test]
    fn worst_case_fits_sniff_max() {
        // Largest accepted prefix: longest machine name, page bits, maximal
        // capabilities, then the costliest end (an unknown subsection name).
        let name = [b'm'; MAX_MACHINE_NAME];
        let cap = [b'c'; MAX_CAP_NAME];
        let caps_body = caps(&[&cap[..]; MAX_CAPS as usize]);
        let mut unknown = b"configuration/".to_vec();
        unknown.resize(255, b'z');
        let mut s = stream(
            &name,
            &[
                (SUB_TARGET_PAGE_BITS, 1, &12u32.to_be_bytes()),
                (SUB_CAPABILITIES, 1, &caps_body),
            ],
            &[QEMU_VM_SUBSECTION, 255],
        );
        s.extend(&unknown);
        s.extend(1u32.to_be_bytes());
        assert_eq!(err_kind(sniff(&s)), "unsupported");
        // The unknown subsection is reported once its version is read.
        assert_eq!(check_all_prefixes(&s), s.len());
        assert!(s.len() <= WORST_CASE, "{} > {WORST_CASE}", s.len());
    }

    /// xorshift64*: enough randomness to shake the parser, no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            fixture("qemu72-main-uuid-ignore-shared.bin"),
            fixture("qemu72-main-uuid.bin"),
            fixture("qemu72-multifd-uuid-chan0.bin"),
        ];
        for i in 0..20_000 {
            let input: Vec<u8> = if i % 2 == 0 {
                // Pure noise, sometimes behind a valid magic to get past the first check.
                let len = rng.below(300);
                let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if i % 4 == 0 && v.len() >= 4 {
                    let m = [QEVM_MAGIC, MULTIFD_MAGIC][rng.below(2)];
                    v[..4].copy_from_slice(&m.to_be_bytes());
                }
                v
            } else {
                // A real stream with a few bytes flipped, cut at a random point.
                let mut v = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(v.len().min(140));
                    v[at] = rng.next() as u8;
                }
                v.truncate(rng.below(v.len() + 1));
                v
            };
            let r = sniff(&input);
            // Monotone: an answer, once given, holds for every longer prefix.
            // (NotQemu only as a kind: its message shows more bytes when there are more.)
            if r != Err(SniffError::Incomplete) {
                let mut longer = input.clone();
                longer.extend([0xa5; 8]);
                let again = sniff(&longer);
                if err_kind(r.clone()) == "not-qemu" {
                    assert_eq!(err_kind(again), "not-qemu", "input {input:02x?}");
                } else {
                    assert_eq!(again, r, "input {input:02x?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// The answer's kind for `NotQemu`, whose message quotes the bytes seen
    /// so far and so grows with the prefix; every other answer in full.
    fn stable(r: &Result<StreamKind, SniffError>) -> Result<StreamKind, SniffError> {
        match r {
            Err(SniffError::NotQemu { .. }) => Err(SniffError::NotQemu {
                head: String::new(),
                hint: "",
            }),
            other => other.clone(),
        }
    }

    /// Documented: "never reads past what it needs, so any longer prefix
    /// gives the same answer". Checks all three readers on every prefix.
    fn check_prefix_monotone(bytes: &[u8]) -> Result<(), TestCaseError> {
        let (mut sniffed, mut advised, mut resumed) = (None, None, None);
        for n in 0..=bytes.len() {
            let p = &bytes[..n];
            let s = stable(&sniff(p));
            match &sniffed {
                Some((at, first)) => {
                    prop_assert_eq!(&s, first, "sniff: prefix {} vs {}", n, at)
                }
                None if s != Err(SniffError::Incomplete) => sniffed = Some((n, s)),
                None => {}
            }
            let a = postcopy_advised(p);
            match advised {
                Some((at, first)) => {
                    prop_assert_eq!(a, Some(first), "postcopy_advised: prefix {} vs {}", n, at)
                }
                None => advised = a.map(|v| (n, v)),
            }
            let r = resume_stream(p);
            match resumed {
                Some((at, first)) => {
                    prop_assert_eq!(r, Some(first), "resume_stream: prefix {} vs {}", n, at)
                }
                None => resumed = r.map(|v| (n, v)),
            }
        }
        if let Some((at, _)) = sniffed {
            prop_assert!(at <= WORST_CASE, "sniff needed {} bytes", at);
        }
        Ok(())
    }

    /// Bytes that get past the first checks often: a known magic or a
    /// command byte, then noise over the bytes that matter in the layout.
    fn noisy() -> impl Strategy<Value = Vec<u8>> {
        let head = prop::sample::select(vec![
            vec![],
            QEVM_MAGIC.to_be_bytes().to_vec(),
            [QEVM_MAGIC, QEVM_VERSION].map(u32::to_be_bytes).concat(),
            [
                &QEVM_MAGIC.to_be_bytes()[..],
                &QEVM_VERSION.to_be_bytes(),
                &[QEMU_VM_CONFIGURATION, 0, 0, 0],
            ]
            .concat(),
            [MULTIFD_MAGIC, MULTIFD_VERSION]
                .map(u32::to_be_bytes)
                .concat(),
            POSTCOPY_MAGIC.to_be_bytes().to_vec(),
            vec![QEMU_VM_COMMAND, 0, MIG_CMD_RECV_BITMAP as u8, 0],
        ]);
        let byte = prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![0u8, 1, 3, 4, 5, 7, 8, 0x0a, 0x0d, 0x10, 0x11, 0xff]),
            prop::sample::select(SUB_UUID.to_vec()),
        ];
        (head, prop::collection::vec(byte, 0..160)).prop_map(|(mut h, t)| {
            h.extend(t);
            h
        })
    }

    /// A main stream as QEMU writes it (see the module comment), and what
    /// sniff must say about it.
    #[derive(Debug, Clone)]
    struct Main {
        bytes: Vec<u8>,
        kind: StreamKind,
        /// Whether an advise is among the first MAX_LEADING_COMMANDS commands.
        advised: bool,
    }

    fn machine_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(0x21u8..0x7f, 1..24),
            prop::collection::vec(0x21u8..0x7f, 0..=MAX_MACHINE_NAME),
        ]
    }

    fn command() -> impl Strategy<Value = (u16, Vec<u8>)> {
        (
            prop_oneof![Just(MIG_CMD_POSTCOPY_ADVISE), any::<u16>()],
            prop::collection::vec(any::<u8>(), 0..20),
        )
    }

    fn main_stream() -> impl Strategy<Value = Main> {
        (
            prop::option::weighted(0.85, machine_name()),
            prop::option::of(any::<u32>()),
            prop::option::of(prop::collection::vec(
                prop::collection::vec(any::<u8>(), 0..=MAX_CAP_NAME),
                0..=MAX_CAPS as usize,
            )),
            prop::option::of(any::<[u8; 16]>()),
            prop::collection::vec(command(), 0..10),
            prop::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(machine, page_bits, caps, uuid, commands, rest)| {
                let mut v = QEVM_MAGIC.to_be_bytes().to_vec();
                v.extend(QEVM_VERSION.to_be_bytes());
                let mut kind = StreamKind::Main {
                    uuid: None,
                    machine: None,
                };
                if let Some(name) = &machine {
                    v.push(QEMU_VM_CONFIGURATION);
                    v.extend((name.len() as u32).to_be_bytes());
                    v.extend(name);
                    let mut sub = |name: &[u8], body: Vec<u8>| {
                        v.push(QEMU_VM_SUBSECTION);
                        v.push(name.len() as u8);
                        v.extend(name);
                        v.extend(1u32.to_be_bytes());
                        v.extend(body);
                    };
                    if let Some(bits) = page_bits {
                        sub(SUB_TARGET_PAGE_BITS, bits.to_be_bytes().to_vec());
                    }
                    if let Some(caps) = &caps {
                        let mut body = (caps.len() as u32).to_be_bytes().to_vec();
                        for c in caps {
                            body.push(c.len() as u8);
                            body.extend(c);
                        }
                        sub(SUB_CAPABILITIES, body);
                    }
                    if let Some(u) = uuid {
                        sub(SUB_UUID, u.to_vec());
                    }
                    kind = StreamKind::Main {
                        uuid: uuid.map(Uuid::from_bytes),
                        machine: Some(String::from_utf8(name.clone()).unwrap()),
                    };
                }
                let advised = commands
                    .iter()
                    .take(MAX_LEADING_COMMANDS)
                    .any(|(cmd, _)| *cmd == MIG_CMD_POSTCOPY_ADVISE);
                for (cmd, data) in &commands {
                    v.push(QEMU_VM_COMMAND);
                    v.extend(cmd.to_be_bytes());
                    v.extend((data.len() as u16).to_be_bytes());
                    v.extend(data);
                }
                // RAM's SECTION_START, then whatever.
                v.push(QEMU_VM_SECTION_START);
                v.extend(rest);
                Main {
                    bytes: v,
                    kind,
                    advised,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_bytes_no_panic_and_prefix_monotone(bytes in noisy()) {
            check_prefix_monotone(&bytes)?;
        }

        #[test]
        fn mutated_streams_no_panic_and_prefix_monotone(
            m in main_stream(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = m.bytes;
            for (at, b) in edits {
                let i = at.index(bytes.len().min(120));
                bytes[i] = b;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            check_prefix_monotone(&bytes)?;
        }

        #[test]
        fn main_streams_sniff_to_their_kind(m in main_stream()) {
            prop_assert_eq!(sniff(&m.bytes), Ok(m.kind.clone()));
            prop_assert_eq!(postcopy_advised(&m.bytes), Some(m.advised));
            prop_assert_eq!(resume_stream(&m.bytes), Some(false));
            check_prefix_monotone(&m.bytes)?;
        }

        #[test]
        fn multifd_packets_sniff_to_their_channel(
            uuid in any::<[u8; 16]>(),
            channel in any::<u8>(),
            reserved in any::<[u8; 39]>(),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut v = [MULTIFD_MAGIC, MULTIFD_VERSION].map(u32::to_be_bytes).concat();
            v.extend(uuid);
            v.push(channel);
            v.extend(reserved);
            prop_assert_eq!(v.len(), MULTIFD_INIT_LEN);
            prop_assert_eq!(sniff(&v[..MULTIFD_INIT_LEN - 1]), Err(SniffError::Incomplete));
            v.extend(tail);
            let want = StreamKind::Multifd { uuid: Uuid::from_bytes(uuid), channel };
            prop_assert_eq!(sniff(&v), Ok(want));
            prop_assert_eq!(postcopy_advised(&v), Some(false));
            check_prefix_monotone(&v)?;
        }

        #[test]
        fn recv_bitmap_is_a_resumed_stream(
            block in prop::collection::vec(any::<u8>(), 1..=255),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut v = vec![QEMU_VM_COMMAND];
            v.extend(MIG_CMD_RECV_BITMAP.to_be_bytes());
            v.extend((block.len() as u16 + 1).to_be_bytes());
            v.push(block.len() as u8);
            v.extend(&block);
            v.extend(tail);
            prop_assert_eq!(resume_stream(&v), Some(true));
            let not_qemu = matches!(sniff(&v), Err(SniffError::NotQemu { .. }));
            prop_assert!(not_qemu);
            check_prefix_monotone(&v)?;
        }
    }
}
