//! Fixed-newstyle handshake as pure code: bytes in, reply bytes and an outcome out.
//!
//! The server side that owns the socket (`server.rs`) reads the client flags and each option
//! header and payload, then calls [`Negotiation::handle`]; everything protocol-shaped lives here
//! and is unit-tested byte for byte.

use super::wire::*;

/// What the handshake needs to know about one export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
}

/// Limits we announce in NBD_INFO_BLOCK_SIZE.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ/WRITE payload we accept (the protocol's customary 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Option payloads longer than this are refused by disconnecting (strings are <= 4096 bytes).
pub const MAX_OPTION_DATA: u32 = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client flags {0:#x} contain bits we do not know")]
    UnknownClientFlags(u32),
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    #[error("option header has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than the {MAX_OPTION_DATA} we accept")]
    OptionTooLong { option: u32, len: u32 },
}

pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
    let f = u32::from_be_bytes(b);
    if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(f));
    }
    if f & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(ClientFlags {
        no_zeroes: f & FLAG_C_NO_ZEROES != 0,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, HandshakeError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
    if len > MAX_OPTION_DATA {
        return Err(HandshakeError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// What the session agreed on when the handshake ends in transmission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    pub export: usize,
    pub structured: bool,
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the reply bytes, read the next option.
    Continue,
    /// Send the reply bytes, then close (NBD_OPT_ABORT).
    Abort,
    /// Send the reply bytes, then enter transmission.
    Transmit(Agreed),
    /// Close without a reply; the string says why (for the log).
    Disconnect(String),
}

pub fn transmission_flags(e: &ExportInfo) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        // Replies go out only after the I/O completed and FLUSH syncs the whole file, so a
        // FLUSH on any connection covers writes completed on every other one.
        | TFLAG_CAN_MULTI_CONN;
    if e.read_only {
        f |= TFLAG_READ_ONLY;
    }
    f
}

/// The server's side of option haggling for one connection.
pub struct Negotiation<'a> {
    exports: &'a [ExportInfo],
    no_zeroes: bool,
    structured: bool,
    /// Export for which base:allocation was selected by NBD_OPT_SET_META_CONTEXT.
    meta_for: Option<String>,
    /// Why the last option was refused, for the server's log.
    pub last_refusal: Option<String>,
}

impl<'a> Negotiation<'a> {
    pub fn new(exports: &'a [ExportInfo], flags: ClientFlags) -> Self {
        Negotiation {
            exports,
            no_zeroes: flags.no_zeroes,
            structured: false,
            meta_for: None,
            last_refusal: None,
        }
    }

    /// The empty name is the default export: the first one configured.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return if self.exports.is_empty() {
                None
            } else {
                Some(0)
            };
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Handle one option; reply bytes are appended to `out`.
    pub fn handle(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        self.last_refusal = None;
        let start = out.len();
        let outcome = self.dispatch(option, data, out);
        if let Some((reply, msg)) = first_error(&out[start..]) {
            self.last_refusal = Some(format!("option {option} refused ({reply:#x}): {msg}"));
        }
        outcome
    }

    fn dispatch(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Outcome::Abort
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Outcome::Continue;
                }
                for e in self.exports {
                    let mut p = Vec::with_capacity(4 + e.name.len());
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    option_reply(out, option, REP_SERVER, &p);
                }
                option_reply(out, option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "takes no data");
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Outcome::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            OPT_STARTTLS => {
                option_error(
                    out,
                    option,
                    REP_ERR_POLICY,
                    "TLS is not offered on this socket",
                );
                Outcome::Continue
            }
            _ => {
                option_error(out, option, REP_ERR_UNSUP, "option not supported");
                Outcome::Continue
            }
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let Ok(name) = std::str::from_utf8(data) else {
            return Outcome::Disconnect("NBD_OPT_EXPORT_NAME with a name that is not UTF-8".into());
        };
        let Some(idx) = self.find(name) else {
            // The protocol gives EXPORT_NAME no way to say "unknown": we can only hang up.
            return Outcome::Disconnect(format!("NBD_OPT_EXPORT_NAME for unknown export {name:?}"));
        };
        let e = &self.exports[idx];
        let flags = transmission_flags(e);
        out.extend_from_slice(&e.size.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Outcome::Transmit(Agreed {
            export: idx,
            structured: self.structured,
            base_allocation: self.structured && self.meta_for.as_deref() == Some(e.name.as_str()),
            transmission_flags: flags,
        })
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let Some((name, infos)) = parse_info_request(data) else {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO request",
            );
            return Outcome::Continue;
        };
        let Some(idx) = self.find(&name) else {
            option_error(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
            return Outcome::Continue;
        };
        let e = &self.exports[idx];
        let flags = transmission_flags(e);
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&e.size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        option_reply(out, option, REP_INFO, &p);
        // Block sizes go out whether asked or not: clients that honour them split better.
        let mut p = Vec::with_capacity(14);
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        p.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        option_reply(out, option, REP_INFO, &p);
        for info in infos {
            match info {
                INFO_NAME => {
                    let mut p = INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(e.name.as_bytes());
                    option_reply(out, option, REP_INFO, &p);
                }
                INFO_DESCRIPTION if !e.description.is_empty() => {
                    let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    p.extend_from_slice(e.description.as_bytes());
                    option_reply(out, option, REP_INFO, &p);
                }
                _ => {}
            }
        }
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_INFO {
            return Outcome::Continue;
        }
        Outcome::Transmit(Agreed {
            export: idx,
            structured: self.structured,
            base_allocation: self.structured && self.meta_for.as_deref() == Some(e.name.as_str()),
            transmission_flags: flags,
        })
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        if !self.structured {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return Outcome::Continue;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            );
            return Outcome::Continue;
        };
        let Some(idx) = self.find(&name) else {
            option_error(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            );
            return Outcome::Continue;
        };
        let wants_alloc = if option == OPT_LIST_META_CONTEXT {
            // LIST with no query lists everything; "base:" lists the whole namespace.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
        } else {
            queries.iter().any(|q| q == META_BASE_ALLOCATION)
        };
        if wants_alloc {
            let mut p = META_ID_BASE_ALLOCATION.to_be_bytes().to_vec();
            p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &p);
        }
        if option == OPT_SET_META_CONTEXT {
            self.meta_for = wants_alloc.then(|| self.exports[idx].name.clone());
        }
        option_reply(out, option, REP_ACK, &[]);
        Outcome::Continue
    }
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn option_error(out: &mut Vec<u8>, option: u32, reply: u32, msg: &str) {
    option_reply(out, option, reply, msg.as_bytes());
}

/// The first error reply in a run of option replies: (reply type, message).
fn first_error(mut b: &[u8]) -> Option<(u32, String)> {
    while b.len() >= 20 {
        let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        let payload = b.get(20..20 + n)?;
        if ty & (1 << 31) != 0 {
            return Some((ty, String::from_utf8_lossy(payload).into_owned()));
        }
        b = &b[20 + n..];
    }
    None
}

/// A cursor over option payloads: every read checks its bounds.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut r = Reader(data);
    let name = r.string()?;
    let n = r.u16()? as usize;
    let infos = (0..n).map(|_| r.u16()).collect::<Option<Vec<_>>>()?;
    r.0.is_empty().then_some((name, infos))
}

fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut r = Reader(data);
    let name = r.string()?;
    let n = r.u32()? as usize;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(r.string()?);
    }
    r.0.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "vol1".into(),
                size: 1 << 20,
                read_only: false,
                description: String::new(),
            },
            ExportInfo {
                name: "ro".into(),
                size: 4096,
                read_only: true,
                description: "read only".into(),
            },
        ]
    }

    fn neg(ex: &[ExportInfo]) -> Negotiation<'_> {
        Negotiation::new(ex, ClientFlags { no_zeroes: true })
    }

    fn info_req(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_req(name: &str, qs: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(qs.len() as u32).to_be_bytes());
        for q in qs {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Split a run of option replies into (option, type, payload).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let n = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((opt, ty, b[20..20 + n].to_vec()));
            b = &b[20 + n..];
        }
        v
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0, 3
            ]
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 0]),
            Err(HandshakeError::NotFixedNewstyle)
        );
        assert_eq!(
            parse_client_flags([0, 0, 1, 1]),
            Err(HandshakeError::UnknownClientFlags(0x101))
        );
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&7u32.to_be_bytes());
        h[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader { option: 7, len: 10 })
        );
        h[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(HandshakeError::OptionTooLong { .. })
        ));
        h[0] = b'X';
        assert!(matches!(
            parse_option_header(&h),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn go_replies_export_block_size_ack_byte_for_byte() {
        let ex = exports();
        let mut n = neg(&ex);
        let mut out = Vec::new();
        let o = n.handle(OPT_GO, &info_req("vol1", &[INFO_BLOCK_SIZE]), &mut out);
        let flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN;
        assert_eq!(
            o,
            Outcome::Transmit(Agreed {
                export: 0,
                structured: false,
                base_allocation: false,
                transmission_flags: flags
            })
        );
        let mut expect = Vec::new();
        // NBD_REP_INFO / NBD_INFO_EXPORT: size 1 MiB, flags 0x0165.
        expect.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]);
        // NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: 1, 4096, 32 MiB.
        expect.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 14, 0, 3]);
        expect.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        // NBD_REP_ACK.
        expect.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(out, expect);
        assert_eq!(flags, 0x016d);
    }

    #[test]
    fn read_only_export_has_read_only_flag() {
        let ex = exports();
        let mut out = Vec::new();
        match neg(&ex).handle(OPT_GO, &info_req("ro", &[]), &mut out) {
            Outcome::Transmit(a) => assert!(a.transmission_flags & TFLAG_READ_ONLY != 0),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn unknown_export_gets_err_unknown_and_stays_in_haggling() {
        let ex = exports();
        let mut n = neg(&ex);
        let mut out = Vec::new();
        assert_eq!(
            n.handle(OPT_GO, &info_req("nope", &[]), &mut out),
            Outcome::Continue
        );
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert!(n
            .last_refusal
            .as_deref()
            .unwrap()
            .contains("no export named \"nope\""));
        out.clear();
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, b"nope", &mut out),
            Outcome::Disconnect(_)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn unknown_option_is_unsupported_and_malformed_go_is_invalid() {
        let ex = exports();
        let mut n = neg(&ex);
        let mut out = Vec::new();
        assert_eq!(n.handle(99, b"xyz", &mut out), Outcome::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        out.clear();
        // Name length claims 200 bytes but only 3 follow.
        assert_eq!(
            n.handle(OPT_GO, &[0, 0, 0, 200, 1, 2, 3], &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn list_names_every_export() {
        let ex = exports();
        let mut out = Vec::new();
        neg(&ex).handle(OPT_LIST, &[], &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], (OPT_LIST, REP_SERVER, b"\0\0\0\x04vol1".to_vec()));
        assert_eq!(r[1], (OPT_LIST, REP_SERVER, b"\0\0\0\x02ro".to_vec()));
        assert_eq!(r[2], (OPT_LIST, REP_ACK, vec![]));
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let ex = exports();
        let mut out = Vec::new();
        let mut n = Negotiation::new(&ex, ClientFlags { no_zeroes: false });
        assert!(matches!(
            n.handle(OPT_EXPORT_NAME, b"vol1", &mut out),
            Outcome::Transmit(_)
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        neg(&ex).handle(OPT_EXPORT_NAME, b"", &mut out);
        assert_eq!(out.len(), 10, "default export, no zeroes");
    }

    #[test]
    fn meta_context_needs_structured_and_selects_base_allocation() {
        let ex = exports();
        let mut n = neg(&ex);
        let mut out = Vec::new();
        n.handle(
            OPT_SET_META_CONTEXT,
            &meta_req("vol1", &[META_BASE_ALLOCATION]),
            &mut out,
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        n.handle(OPT_STRUCTURED_REPLY, &[], &mut out);
        assert_eq!(replies(&out), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);
        out.clear();
        n.handle(
            OPT_SET_META_CONTEXT,
            &meta_req("vol1", &["qemu:dirty-bitmap:x", META_BASE_ALLOCATION]),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &META_ID_BASE_ALLOCATION.to_be_bytes());
        assert_eq!(&r[0].2[4..], META_BASE_ALLOCATION.as_bytes());
        out.clear();
        match n.handle(OPT_GO, &info_req("vol1", &[]), &mut out) {
            Outcome::Transmit(a) => assert!(a.structured && a.base_allocation),
            o => panic!("{o:?}"),
        }
        // Contexts chosen for one export do not carry over to another.
        let mut out = Vec::new();
        match n.handle(OPT_GO, &info_req("ro", &[]), &mut out) {
            Outcome::Transmit(a) => assert!(a.structured && !a.base_allocation),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn abort_is_acked() {
        let ex = exports();
        let mut out = Vec::new();
        assert_eq!(neg(&ex).handle(OPT_ABORT, &[], &mut out), Outcome::Abort);
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
    }
}
