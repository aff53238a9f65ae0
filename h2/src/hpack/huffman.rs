//! HPACK's Huffman code (RFC 7541 §5.2, Appendix B): decoding only, since the proxy
//! sends its strings raw (as HAProxy does): encoding would cost more CPU than the
//! bytes it saves are worth on the links a sidecar uses.
//!
//! Decoding walks a nibble at a time through a table built once from the code: each
//! state is a node of the code tree, and a nibble (shorter than the shortest code,
//! 5 bits) completes at most one symbol.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};

/// Why a Huffman string did not decode (RFC 7541 §5.2: the EOS symbol, or padding
/// longer than 7 bits or not all ones, are decoding errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HuffmanError;

/// Decodes `src`.
pub fn decode(src: &[u8]) -> Result<Bytes, HuffmanError> {
    let table = table();
    // The shortest code is 5 bits: at most 8/5 output bytes per input byte.
    let mut out = BytesMut::with_capacity(src.len() * 8 / 5 + 1);
    let mut state = 0u8;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = table.steps[state as usize * 16 + nibble as usize];
            if step.flags & FAIL != 0 {
                return Err(HuffmanError);
            }
            if step.flags & EMIT != 0 {
                out.extend_from_slice(&[step.symbol]);
            }
            state = step.next;
        }
    }
    if table.accepting[state as usize] {
        Ok(out.freeze())
    } else {
        Err(HuffmanError)
    }
}

const EMIT: u8 = 1;
const FAIL: u8 = 2;

#[derive(Clone, Copy, Default)]
struct Step {
    next: u8,
    symbol: u8,
    flags: u8,
}

struct Table {
    /// 16 steps per state (a node of the code tree that is not a leaf).
    steps: Vec<Step>,
    /// Whether a string may end in this state: the bits since the last symbol are
    /// all ones and fewer than 8 (a prefix of EOS used as padding).
    accepting: Vec<bool>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(build)
}

/// A node of the code tree: children by bit, or a leaf's symbol (256 is EOS).
#[derive(Clone, Copy)]
enum Node {
    Branch([u16; 2]),
    Leaf(u16),
}

fn build() -> Table {
    // The code tree: internal nodes first get numbers as they are made, so the root
    // is state 0 and every internal node's number fits a byte (256 of them).
    let mut nodes = vec![Node::Branch([u16::MAX; 2])];
    let mut internal = vec![0u16]; // node index -> state number, for branches
    let mut state_of = vec![0u8; 1];
    for symbol in 0..=256u16 {
        let (code, len) = if symbol == 256 {
            (EOS_CODE, EOS_LEN)
        } else {
            (CODES[symbol as usize], LENGTHS[symbol as usize])
        };
        let mut at = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            let Node::Branch(children) = nodes[at] else {
                unreachable!("the code is prefix-free")
            };
            let child = children[bit];
            if i == 0 {
                nodes.push(Node::Leaf(symbol));
                let leaf = nodes.len() as u16 - 1;
                set_child(&mut nodes, at, bit, leaf);
            } else if child == u16::MAX {
                nodes.push(Node::Branch([u16::MAX; 2]));
                let branch = nodes.len() as u16 - 1;
                set_child(&mut nodes, at, bit, branch);
                state_of.resize(nodes.len(), 0);
                state_of[branch as usize] = internal.len() as u8;
                internal.push(branch);
                at = branch as usize;
            } else {
                at = child as usize;
            }
        }
    }
    debug_assert_eq!(internal.len(), 256);

    // Which branches are reached from the root by up to 7 one-bits: where a string
    // may end, its last bits being a prefix of EOS as padding.
    let mut accepting = vec![false; internal.len()];
    let mut at = 0usize;
    for _depth in 0..8 {
        accepting[state_of[at] as usize] = true;
        let Node::Branch(children) = nodes[at] else {
            break;
        };
        match nodes[children[1] as usize] {
            Node::Branch(_) => at = children[1] as usize,
            Node::Leaf(_) => break,
        }
    }

    let mut steps = vec![Step::default(); internal.len() * 16];
    for (state, &node) in internal.iter().enumerate() {
        for nibble in 0..16u8 {
            let mut at = node as usize;
            let mut step = Step::default();
            for i in (0..4).rev() {
                let bit = ((nibble >> i) & 1) as usize;
                let Node::Branch(children) = nodes[at] else {
                    unreachable!()
                };
                match nodes[children[bit] as usize] {
                    Node::Leaf(256) => {
                        step.flags |= FAIL;
                        break;
                    }
                    Node::Leaf(symbol) => {
                        step.flags |= EMIT;
                        step.symbol = symbol as u8;
                        at = 0;
                    }
                    Node::Branch(_) => at = children[bit] as usize,
                }
            }
            step.next = state_of[at];
            steps[state * 16 + nibble as usize] = step;
        }
    }
    Table { steps, accepting }
}

fn set_child(nodes: &mut [Node], at: usize, bit: usize, child: u16) {
    if let Node::Branch(children) = &mut nodes[at] {
        children[bit] = child;
    }
}

const EOS_CODE: u32 = 0x3fff_ffff;
const EOS_LEN: u8 = 30;

/// The codes of symbols 0 to 255, most significant bit first (RFC 7541 Appendix B).
#[rustfmt::skip]
const CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7,
    0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec,
    0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3,
    0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb,
    0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa,
    0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
    0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc,
    0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62,
    0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a,
    0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72,
    0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22,
    0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26,
    0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7,
    0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
    0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc,
    0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9,
    0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
    0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef,
    0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
    0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec,
    0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef,
    0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1,
    0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec,
    0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed,
    0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2,
    0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5,
    0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4,
    0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea,
    0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

/// The length in bits of each symbol's code.
#[rustfmt::skip]
const LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

#[cfg(test)]
pub(super) fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        acc = (acc << LENGTHS[b as usize]) | CODES[b as usize] as u64;
        bits += LENGTHS[b as usize] as u32;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 C.4.1 and C.4.2.
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(&decode(&www).unwrap()[..], b"www.example.com");
        assert_eq!(
            &decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).unwrap()[..],
            b"no-cache"
        );
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(&decode(&encode(&all)).unwrap()[..], &all[..]);
        for len in 0..40 {
            let zeros = vec![b'0'; len];
            assert_eq!(&decode(&encode(&zeros)).unwrap()[..], &zeros[..]);
        }
    }

    #[test]
    fn rejects_bad_padding_and_eos() {
        // 'a' is 00011 (5 bits); padding with zeros is invalid.
        assert_eq!(decode(&[0b0001_1000]), Err(HuffmanError));
        assert_eq!(&decode(&[0b0001_1111]).unwrap()[..], b"a");
        // A whole byte of padding is too much.
        assert_eq!(decode(&[0b0001_1111, 0xff]), Err(HuffmanError));
        // EOS itself (30 one-bits).
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError));
    }
}
