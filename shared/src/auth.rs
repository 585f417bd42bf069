//! Authentication of the replication link (protocol 4): a pre-shared key, a mutual proof of it in the
//! handshake, and an HMAC tag on every frame after it. Whoever can reach the replication port must not be
//! able to join as a spare (and receive every client's bytes), pose as the primary, or alter, replay,
//! reorder or drop a frame of an established link unnoticed. Confidentiality is not a goal: the
//! replication network is trusted not to be read, only not to be written to.
//!
//! Primitives, all from well-kept crates: HMAC-SHA-256 (RFC 2104; `hmac`, `sha2`), HKDF-SHA-256 (RFC 5869;
//! `hkdf`), nonces from the kernel (`getrandom`). Tags are compared in constant time (`Mac::verify_slice`).
//!
//! # Handshake (see `link` for the messages)
//!
//! ```text
//!  backup → primary   AuthHello   { hello, nonce_b }                    nonce: 32 random bytes
//!  primary → backup   AuthWelcome { welcome, nonce_p, proof_p }
//!  backup → primary   Proof { proof_b }   or   Abort { reason } when proof_p is wrong
//!
//!  transcript = SHA-256("understudy link v4" ‖ codec(hello) ‖ nonce_b ‖ codec(welcome) ‖ nonce_p)
//!  prk        = HKDF-Extract(salt = transcript, ikm = psk)
//!  k_proof_p, k_proof_b, k_to_backup, k_to_primary = HKDF-Expand(prk, label, 32) with distinct labels
//!  proof_p    = HMAC(k_proof_p, transcript)      proof_b = HMAC(k_proof_b, transcript)
//! ```
//!
//! The transcript binds both fresh nonces and everything each side stated (cluster, node names, roles,
//! version range and the chosen version, epochs), so a proof cannot be replayed into another handshake, and
//! the two roles' proofs use different keys, so one side's proof cannot be reflected back as the other's.
//!
//! # Frames
//!
//! Every frame after the handshake carries, at the end of its payload, `HMAC(k_dir, n ‖ body)` (32 bytes),
//! where `n` is the frame's number in its direction (a `u64` from 0, big-endian, never sent) and `k_dir` the
//! key of that direction. A replayed, reordered, dropped, truncated or altered frame, or one from another
//! link, fails its tag ([`IntegrityError`]), and the link ends. The CRC of the frame layer stays: it tells
//! corruption on the wire (an honest error) from tampering (a matching CRC with a wrong tag).
//!
//! Everything here is pure except [`Psk::load`] (reads the key file) and [`nonce`] (asks the kernel).

use crate::codec;
use crate::protocol::{Hello, Role, Welcome};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a frame tag and of a handshake proof (HMAC-SHA-256, untruncated).
pub const TAG_LEN: usize = 32;
/// Fewest key bytes accepted (128 bits).
pub const MIN_KEY_BYTES: usize = 16;
/// Most key bytes accepted: a longer file is more likely the wrong file than a better key.
pub const MAX_KEY_BYTES: usize = 512;

/// A handshake nonce.
pub type Nonce = [u8; NONCE_LEN];
/// A frame tag or handshake proof.
pub type Tag = [u8; TAG_LEN];

// ---------------------------------------------------------------------------------
// The key
// ---------------------------------------------------------------------------------

/// The pre-shared key both nodes of a pair hold. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk(Vec<u8>);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why the text of a key file is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    /// A character that is neither a hex digit nor surrounding white space.
    #[error("character {at} is not a hex digit (the file holds the key as hex, like `xxd -p` writes it)")]
    NotHex { at: usize },
    /// An odd number of hex digits.
    #[error("an odd number of hex digits ({digits})")]
    OddDigits { digits: usize },
    /// Fewer than [`MIN_KEY_BYTES`] bytes.
    #[error("{bytes} bytes of key; at least {MIN_KEY_BYTES} ({} hex digits) are needed", MIN_KEY_BYTES * 2)]
    TooShort { bytes: usize },
    /// More than [`MAX_KEY_BYTES`] bytes.
    #[error("{bytes} bytes of key; at most {MAX_KEY_BYTES} are accepted (is this the right file?)")]
    TooLong { bytes: usize },
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be opened or read.
    #[error("cannot read the pre-shared key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Users other than the owner and group may read the file.
    #[error("the pre-shared key file {} is readable by other users (mode {mode:04o}): chmod 600 it", path.display())]
    Exposed { path: PathBuf, mode: u32 },
    /// The file does not hold a usable key.
    #[error("the pre-shared key file {} does not hold a key: {problem}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        problem: KeyFormatError,
    },
}

impl Psk {
    /// A key of these bytes, [`MIN_KEY_BYTES`]..=[`MAX_KEY_BYTES`] long.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Psk, KeyFormatError> {
        match bytes.len() {
            n if n < MIN_KEY_BYTES => Err(KeyFormatError::TooShort { bytes: n }),
            n if n > MAX_KEY_BYTES => Err(KeyFormatError::TooLong { bytes: n }),
            _ => Ok(Psk(bytes)),
        }
    }

    /// Reads a key file's text: hex digits (either case), optionally surrounded by white space (a trailing
    /// newline). Nothing else: no `0x`, no comments, no separators inside.
    pub fn parse(text: &str) -> Result<Psk, KeyFormatError> {
        let start = text.len() - text.trim_start().len();
        let hex = text.trim();
        if let Some(i) = hex.find(|c: char| !c.is_ascii_hexdigit()) {
            return Err(KeyFormatError::NotHex { at: start + i });
        }
        if !hex.len().is_multiple_of(2) {
            return Err(KeyFormatError::OddDigits { digits: hex.len() });
        }
        // Checked above: only hex digits, an even number of them.
        Psk::from_bytes(hex::decode(hex).map_err(|_| KeyFormatError::NotHex { at: start })?)
    }

    /// Reads the key file at `path`: refused when others may read it ([`check_mode`]), unreadable, or not a
    /// key ([`Psk::parse`]).
    pub fn load(path: &Path) -> Result<Psk, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let read = |source| KeyError::Read { path: path.to_owned(), source };
        let mut file = std::fs::File::open(path).map_err(read)?;
        let mode = file.metadata().map_err(read)?.mode();
        check_mode(mode).map_err(|mode| KeyError::Exposed { path: path.to_owned(), mode })?;
        let mut text = String::new();
        // Bounded: a key file is small, and a wrong path (a log, a device) must not be read whole.
        let limit = (MAX_KEY_BYTES * 2 + 64) as u64;
        file.by_ref().take(limit + 1).read_to_string(&mut text).map_err(read)?;
        if text.len() as u64 > limit {
            return Err(KeyError::Format {
                path: path.to_owned(),
                problem: KeyFormatError::TooLong { bytes: text.trim().len() / 2 },
            });
        }
        Psk::parse(&text).map_err(|problem| KeyError::Format { path: path.to_owned(), problem })
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Refuses a key file that users other than its owner and group may read (any of the "other" bits, which
/// covers world-writable too); returns the permission bits then. Group read is allowed, for a key owned by
/// root and readable by a service group.
pub fn check_mode(mode: u32) -> Result<(), u32> {
    if mode & 0o007 != 0 { Err(mode & 0o7777) } else { Ok(()) }
}

/// How a link authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LinkAuth {
    /// No authentication and no frame tags (`--insecure-replication`; also what a peer before protocol 4
    /// speaks). The binaries refuse to start this way unless told so explicitly.
    #[default]
    Insecure,
    /// Mutual proof of this key, and a tag on every frame.
    Psk(Psk),
}

impl LinkAuth {
    /// Whether frames carry tags.
    pub fn is_secure(&self) -> bool {
        matches!(self, LinkAuth::Psk(_))
    }
}

// ---------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------

/// A fresh random nonce from the kernel.
pub fn nonce() -> Result<Nonce, getrandom::Error> {
    let mut n = [0; NONCE_LEN];
    getrandom::fill(&mut n)?;
    Ok(n)
}

/// The hash of everything both sides stated in the handshake. `welcome` is the primary's accepted welcome.
pub fn transcript(hello: &Hello, nonce_b: &Nonce, welcome: &Welcome, nonce_p: &Nonce) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"understudy link v4");
    // Both types always encode (plain structs and strings); both sides hash the same bytes either way.
    for (encoded, nonce) in [(codec::encode(hello), nonce_b), (codec::encode(welcome), nonce_p)] {
        let encoded = encoded.unwrap_or_default();
        h.update((encoded.len() as u64).to_be_bytes());
        h.update(&encoded);
        h.update(nonce);
    }
    h.finalize().into()
}

/// The keys of one link, derived from the key and the handshake's transcript.
pub struct SessionKeys {
    transcript: [u8; 32],
    proof_primary: HmacSha256,
    proof_backup: HmacSha256,
    to_backup: HmacSha256,
    to_primary: HmacSha256,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

/// A handshake proof that does not match: the peer holds another key (or none, or is not what it says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {role:?}'s proof does not match this node's pre-shared key")]
pub struct WrongKey {
    /// The role whose proof failed.
    pub role: Role,
}

impl SessionKeys {
    /// Derives the link's keys from `psk` and the handshake `transcript`.
    pub fn derive(psk: &Psk, transcript: [u8; 32]) -> SessionKeys {
        let hk = Hkdf::<Sha256>::new(Some(&transcript), psk.bytes());
        let key = |label: &[u8]| {
            let mut k = [0u8; 32];
            // 32 bytes is far below HKDF-SHA-256's limit of 255 * 32.
            hk.expand(label, &mut k).expect("32 bytes is a valid HKDF-SHA-256 output length");
            HmacSha256::new_from_slice(&k).expect("HMAC takes keys of any length")
        };
        SessionKeys {
            transcript,
            proof_primary: key(b"understudy v4 proof primary"),
            proof_backup: key(b"understudy v4 proof backup"),
            to_backup: key(b"understudy v4 frames primary to backup"),
            to_primary: key(b"understudy v4 frames backup to primary"),
        }
    }

    fn proof_key(&self, role: Role) -> &HmacSha256 {
        match role {
            Role::Primary => &self.proof_primary,
            Role::Backup => &self.proof_backup,
        }
    }

    /// The proof that the node in `role` holds the key.
    pub fn proof(&self, role: Role) -> Tag {
        let mut mac = self.proof_key(role).clone();
        mac.update(&self.transcript);
        mac.finalize().into_bytes().into()
    }

    /// Checks the peer's proof (`role` is the peer's role), in constant time.
    pub fn verify_proof(&self, role: Role, proof: &[u8]) -> Result<(), WrongKey> {
        let mut mac = self.proof_key(role).clone();
        mac.update(&self.transcript);
        mac.verify_slice(proof).map_err(|_| WrongKey { role })
    }

    /// The tagger of frames this node (in `local` role) sends.
    pub fn sealer(&self, local: Role) -> Sealer {
        Sealer { mac: self.direction(local, true).clone(), next: 0 }
    }

    /// The checker of frames this node (in `local` role) receives.
    pub fn opener(&self, local: Role) -> Opener {
        Opener { mac: self.direction(local, false).clone(), next: 0 }
    }

    fn direction(&self, local: Role, sending: bool) -> &HmacSha256 {
        // The primary sends towards the backup; the backup towards the primary.
        match (local, sending) {
            (Role::Primary, true) | (Role::Backup, false) => &self.to_backup,
            (Role::Primary, false) | (Role::Backup, true) => &self.to_primary,
        }
    }
}

// ---------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------

/// Tags the frames one side sends, numbering them from 0.
#[derive(Clone)]
pub struct Sealer {
    mac: HmacSha256,
    next: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer").field("next", &self.next).finish_non_exhaustive()
    }
}

impl Sealer {
    /// The tag of the next frame, whose payload before the tag is `body`. Each call numbers one frame: call
    /// it only for a frame that will be sent.
    pub fn seal(&mut self, body: &[u8]) -> Tag {
        let tag = frame_mac(&self.mac, self.next, body).finalize().into_bytes().into();
        self.next += 1;
        tag
    }

    /// Frames tagged so far.
    pub fn sealed(&self) -> u64 {
        self.next
    }
}

/// Why a received frame is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The payload is shorter than a tag.
    #[error("frame {frame} has {len} bytes, too few to carry its {TAG_LEN}-byte tag")]
    Truncated { frame: u64, len: usize },
    /// The tag does not match.
    #[error(
        "frame {frame} fails its authentication tag: altered, replayed, reordered, after a lost frame, \
         or not from this link's peer"
    )]
    BadTag { frame: u64 },
}

/// Checks the frames one side receives, expecting them numbered from 0.
#[derive(Clone)]
pub struct Opener {
    mac: HmacSha256,
    next: u64,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener").field("next", &self.next).finish_non_exhaustive()
    }
}

impl Opener {
    /// Checks the next frame's `payload` (body then tag) and returns its body. After an error the link must
    /// end: the numbering no longer matches the sender's.
    pub fn open<'a>(&mut self, payload: &'a [u8]) -> Result<&'a [u8], IntegrityError> {
        let frame = self.next;
        let Some(split) = payload.len().checked_sub(TAG_LEN) else {
            return Err(IntegrityError::Truncated { frame, len: payload.len() });
        };
        let (body, tag) = payload.split_at(split);
        frame_mac(&self.mac, frame, body).verify_slice(tag).map_err(|_| IntegrityError::BadTag { frame })?;
        self.next += 1;
        Ok(body)
    }

    /// Frames accepted so far.
    pub fn opened(&self) -> u64 {
        self.next
    }
}

fn frame_mac(key: &HmacSha256, n: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(&n.to_be_bytes());
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk(byte: u8) -> Psk {
        Psk::from_bytes(vec![byte; 32]).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            version: 4,
            min_version: 2,
            cluster: "prod".into(),
            node: "node-b".into(),
            role: Role::Backup,
            epoch: 3,
        }
    }

    fn welcome() -> Welcome {
        Welcome::Accepted { version: 4, node: "node-a".into(), epoch: 3 }
    }

    fn keys(key: &Psk) -> SessionKeys {
        SessionKeys::derive(key, transcript(&hello(), &[1; 32], &welcome(), &[2; 32]))
    }

    /// A frame as the link sends it: body then tag.
    fn sealed(s: &mut Sealer, body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&s.seal(body));
        v
    }

    #[test]
    fn key_file_text_is_hex_with_optional_surrounding_white_space() {
        let hex32 = "00112233445566778899aabbccddeeff";
        assert_eq!(Psk::parse(hex32).unwrap().bytes().len(), 16);
        assert_eq!(Psk::parse(&format!("  {}\n", hex32.to_uppercase())).unwrap(), Psk::parse(hex32).unwrap());
        assert_eq!(Psk::parse(&hex32[..30]), Err(KeyFormatError::TooShort { bytes: 15 }));
        assert_eq!(Psk::parse(&hex32[..31]), Err(KeyFormatError::OddDigits { digits: 31 }));
        assert_eq!(Psk::parse(&format!("\n{hex32}zz")), Err(KeyFormatError::NotHex { at: 33 }));
        assert_eq!(Psk::parse("0011 2233"), Err(KeyFormatError::NotHex { at: 4 }));
        assert_eq!(Psk::parse(""), Err(KeyFormatError::TooShort { bytes: 0 }));
        assert_eq!(Psk::parse(&"ab".repeat(513)), Err(KeyFormatError::TooLong { bytes: 513 }));
        assert!(Psk::parse(&"ab".repeat(512)).is_ok());
    }

    #[test]
    fn key_file_readable_by_others_is_refused_and_group_read_is_allowed() {
        assert_eq!(check_mode(0o100600), Ok(()));
        assert_eq!(check_mode(0o100640), Ok(()));
        assert_eq!(check_mode(0o100400), Ok(()));
        assert_eq!(check_mode(0o100644), Err(0o644));
        assert_eq!(check_mode(0o100602), Err(0o602));
        assert_eq!(check_mode(0o100601), Err(0o601));
    }

    #[test]
    fn the_key_is_never_printed() {
        let text = format!("{:?} {:?}", psk(0xab), LinkAuth::Psk(psk(0xab)));
        assert!(!text.contains("ab, ") && !text.contains("171"), "{text}");
        assert!(text.contains("redacted"));
    }

    #[test]
    fn both_sides_with_the_same_key_accept_each_others_proofs() {
        let (p, b) = (keys(&psk(7)), keys(&psk(7)));
        assert_eq!(b.verify_proof(Role::Primary, &p.proof(Role::Primary)), Ok(()));
        assert_eq!(p.verify_proof(Role::Backup, &b.proof(Role::Backup)), Ok(()));
    }

    #[test]
    fn a_wrong_key_fails_the_proof_both_ways() {
        let (p, b) = (keys(&psk(7)), keys(&psk(8)));
        assert_eq!(b.verify_proof(Role::Primary, &p.proof(Role::Primary)), Err(WrongKey { role: Role::Primary }));
        assert_eq!(p.verify_proof(Role::Backup, &b.proof(Role::Backup)), Err(WrongKey { role: Role::Backup }));
    }

    #[test]
    fn a_proof_is_not_reflected_as_the_other_roles_nor_truncated() {
        let k = keys(&psk(7));
        assert!(k.verify_proof(Role::Backup, &k.proof(Role::Primary)).is_err());
        assert!(k.verify_proof(Role::Primary, &k.proof(Role::Backup)).is_err());
        assert!(k.verify_proof(Role::Primary, &k.proof(Role::Primary)[..16]).is_err());
        assert!(k.verify_proof(Role::Primary, &[]).is_err());
    }

    #[test]
    fn a_proof_from_another_handshake_fails() {
        let key = psk(7);
        let old = keys(&key);
        let each =
            |hello: &Hello, nb, welcome: &Welcome, np| SessionKeys::derive(&key, transcript(hello, nb, welcome, np));
        let mut other_node = hello();
        other_node.node = "node-x".into();
        let mut other_version = hello();
        other_version.min_version = 4;
        let newer = Welcome::Accepted { version: 4, node: "node-a".into(), epoch: 4 };
        for fresh in [
            each(&hello(), &[9; 32], &welcome(), &[2; 32]),
            each(&hello(), &[1; 32], &welcome(), &[9; 32]),
            // The nonces swapped: each is bound to its side.
            each(&hello(), &[2; 32], &welcome(), &[1; 32]),
            each(&other_node, &[1; 32], &welcome(), &[2; 32]),
            each(&other_version, &[1; 32], &welcome(), &[2; 32]),
            each(&hello(), &[1; 32], &newer, &[2; 32]),
        ] {
            assert!(fresh.verify_proof(Role::Primary, &old.proof(Role::Primary)).is_err());
        }
    }

    #[test]
    fn frames_open_in_order_and_each_direction_has_its_own_key() {
        let (p, b) = (keys(&psk(7)), keys(&psk(7)));
        let (mut to_b, mut at_b) = (p.sealer(Role::Primary), b.opener(Role::Backup));
        let (mut to_p, mut at_p) = (b.sealer(Role::Backup), p.opener(Role::Primary));
        for i in 0..5u8 {
            let f = sealed(&mut to_b, &[i; 10]);
            assert_eq!(at_b.open(&f), Ok(&[i; 10][..]));
            let g = sealed(&mut to_p, &[i]);
            assert_eq!(at_p.open(&g), Ok(&[i][..]));
        }
        let empty = sealed(&mut to_b, b"");
        assert_eq!(at_b.open(&empty), Ok(&b""[..]));
        assert_eq!((to_b.sealed(), at_b.opened()), (6, 6));
        // A frame sent towards the backup is not a frame towards the primary, even with the same number.
        let mut p2 = p.sealer(Role::Primary);
        let mut at_p2 = p.opener(Role::Primary);
        assert_eq!(at_p2.open(&sealed(&mut p2, b"x")), Err(IntegrityError::BadTag { frame: 0 }));
    }

    #[test]
    fn an_altered_byte_anywhere_fails_the_tag() {
        let k = keys(&psk(7));
        let mut s = k.sealer(Role::Primary);
        let frame = sealed(&mut s, b"reply bytes for the client");
        for i in 0..frame.len() {
            let mut o = k.opener(Role::Backup);
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            assert_eq!(o.open(&bad), Err(IntegrityError::BadTag { frame: 0 }), "byte {i}");
        }
    }

    #[test]
    fn a_replayed_frame_fails() {
        let k = keys(&psk(7));
        let mut s = k.sealer(Role::Primary);
        let mut o = k.opener(Role::Backup);
        let first = sealed(&mut s, b"ack 1");
        assert!(o.open(&first).is_ok());
        assert_eq!(o.open(&first), Err(IntegrityError::BadTag { frame: 1 }));
    }

    #[test]
    fn reordered_or_dropped_frames_fail() {
        let k = keys(&psk(7));
        let mut s = k.sealer(Role::Primary);
        let (f0, f1, f2) = (sealed(&mut s, b"0"), sealed(&mut s, b"1"), sealed(&mut s, b"2"));
        let mut o = k.opener(Role::Backup);
        assert_eq!(o.open(&f1), Err(IntegrityError::BadTag { frame: 0 }), "reordered");
        let mut o = k.opener(Role::Backup);
        assert!(o.open(&f0).is_ok());
        assert_eq!(o.open(&f2), Err(IntegrityError::BadTag { frame: 1 }), "one dropped");
    }

    #[test]
    fn a_truncated_tag_fails() {
        let k = keys(&psk(7));
        let mut s = k.sealer(Role::Primary);
        let frame = sealed(&mut s, b"body");
        for cut in 0..frame.len() {
            let mut o = k.opener(Role::Backup);
            let got = o.open(&frame[..cut]);
            if cut < TAG_LEN {
                assert_eq!(got, Err(IntegrityError::Truncated { frame: 0, len: cut }));
            } else {
                assert_eq!(got, Err(IntegrityError::BadTag { frame: 0 }), "cut at {cut}");
            }
        }
    }

    #[test]
    fn frames_of_another_key_or_session_fail() {
        let mut s = keys(&psk(7)).sealer(Role::Primary);
        let frame = sealed(&mut s, b"body");
        assert!(keys(&psk(8)).opener(Role::Backup).open(&frame).is_err());
        let other = SessionKeys::derive(&psk(7), transcript(&hello(), &[3; 32], &welcome(), &[2; 32]));
        assert!(other.opener(Role::Backup).open(&frame).is_err());
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    #[test]
    fn key_file_is_loaded_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("understudy-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("psk");
        std::fs::write(&path, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let got = Psk::load(&path);
        assert!(matches!(got, Err(KeyError::Exposed { mode: 0o644, .. })), "{got:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Psk::load(&path).unwrap().bytes().len(), 32);
        std::fs::write(&path, "0011").unwrap();
        let got = Psk::load(&path);
        assert!(matches!(got, Err(KeyError::Format { problem: KeyFormatError::TooShort { bytes: 2 }, .. })), "{got:?}");
        let got = Psk::load(&dir.join("absent"));
        assert!(matches!(got, Err(KeyError::Read { .. })), "{got:?}");
        assert!(got.unwrap_err().to_string().contains("absent"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
