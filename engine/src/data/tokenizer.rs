//! Tokenizers: raw UTF-8 bytes, and GPT-2's byte-pair encoding.
//!
//! GPT-2's BPE comes from the `tiktoken-rs` crate (`r50k_base`, the encoding of GPT-2), whose
//! merge ranks are compiled into the binary: no file or network access is needed at run time.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::DataError;

/// Which tokenizer: the serialisable, comparable name of a [`Tokenizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per UTF-8 byte (vocabulary of 256).
    Bytes,
    /// GPT-2's byte-pair encoding (vocabulary of 50257, end-of-text token 50256).
    Gpt2,
}

impl TokenizerKind {
    /// The name used on the command line and in configs: `"bytes"` or `"gpt2"`.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }

    /// Parses `"bytes"` or `"gpt2"`.
    pub fn from_name(name: &str) -> Result<Self, DataError> {
        match name {
            "bytes" => Ok(TokenizerKind::Bytes),
            "gpt2" => Ok(TokenizerKind::Gpt2),
            _ => Err(DataError::UnknownTokenizer { name: name.to_owned() }),
        }
    }

    /// Number of distinct token ids.
    pub fn vocab_size(self) -> usize {
        match self {
            TokenizerKind::Bytes => Tokenizer::BYTES_VOCAB_SIZE,
            TokenizerKind::Gpt2 => Tokenizer::GPT2_VOCAB_SIZE,
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy)]
enum Inner {
    Bytes,
    Gpt2(&'static CoreBPE),
}

/// A tokenizer, ready to encode and decode. Cheap to copy.
///
/// Build one with [`Tokenizer::bytes`], [`Tokenizer::gpt2`], [`Tokenizer::new`] or
/// [`Tokenizer::from_name`]. The GPT-2 tables are parsed once per process, on first use.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    inner: Inner,
}

static GPT2_BPE: OnceLock<Result<CoreBPE, String>> = OnceLock::new();

impl Tokenizer {
    /// Vocabulary size of the byte tokenizer.
    pub const BYTES_VOCAB_SIZE: usize = 256;
    /// Vocabulary size of GPT-2 (50256 BPE tokens plus `<|endoftext|>`).
    pub const GPT2_VOCAB_SIZE: usize = 50257;
    /// GPT-2's `<|endoftext|>` token id.
    pub const GPT2_EOT: u32 = 50256;

    /// The byte tokenizer: one token per UTF-8 byte.
    pub fn bytes() -> Self {
        Tokenizer { inner: Inner::Bytes }
    }

    /// GPT-2's BPE tokenizer (tiktoken's `r50k_base`).
    pub fn gpt2() -> Result<Self, DataError> {
        let bpe = GPT2_BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string()));
        match bpe {
            Ok(bpe) => Ok(Tokenizer {
                inner: Inner::Gpt2(bpe),
            }),
            Err(reason) => Err(DataError::TokenizerInit { reason: reason.clone() }),
        }
    }

    /// The tokenizer of the given kind.
    pub fn new(kind: TokenizerKind) -> Result<Self, DataError> {
        match kind {
            TokenizerKind::Bytes => Ok(Self::bytes()),
            TokenizerKind::Gpt2 => Self::gpt2(),
        }
    }

    /// The tokenizer named `"bytes"` or `"gpt2"`.
    pub fn from_name(name: &str) -> Result<Self, DataError> {
        Self::new(TokenizerKind::from_name(name)?)
    }

    /// Which tokenizer this is.
    pub fn kind(&self) -> TokenizerKind {
        match self.inner {
            Inner::Bytes => TokenizerKind::Bytes,
            Inner::Gpt2(_) => TokenizerKind::Gpt2,
        }
    }

    /// The tokenizer's name: `"bytes"` or `"gpt2"`.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Number of distinct token ids: 256 for bytes, 50257 for GPT-2.
    pub fn vocab_size(&self) -> usize {
        self.kind().vocab_size()
    }

    /// The end-of-text token, if the tokenizer has one (GPT-2: 50256; bytes: none).
    pub fn eot(&self) -> Option<u32> {
        match self.inner {
            Inner::Bytes => None,
            Inner::Gpt2(_) => Some(Self::GPT2_EOT),
        }
    }

    /// Encodes text into token ids.
    ///
    /// For GPT-2, text that spells a special token (`<|endoftext|>`) is encoded as ordinary
    /// text; append [`Tokenizer::eot`] explicitly where a document boundary is wanted.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.inner {
            Inner::Bytes => text.bytes().map(u32::from).collect(),
            Inner::Gpt2(bpe) => bpe.encode_ordinary(text),
        }
    }

    /// Decodes token ids into text.
    ///
    /// Byte sequences that are not valid UTF-8 (e.g. a multi-byte character cut in two) are
    /// replaced by U+FFFD. A token outside the vocabulary is an error naming it and its index.
    pub fn decode(&self, tokens: &[u32]) -> Result<String, DataError> {
        let vocab_size = self.vocab_size();
        if let Some((index, &token)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab_size) {
            return Err(self.out_of_range(token, index));
        }
        let bytes = match self.inner {
            Inner::Bytes => tokens.iter().map(|&t| t as u8).collect::<Vec<u8>>(),
            Inner::Gpt2(bpe) => bpe.decode_bytes(tokens).map_err(|e| {
                let index = tokens.iter().position(|&t| t == e.token).unwrap_or(0);
                self.out_of_range(e.token, index)
            })?,
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn out_of_range(&self, token: u32, index: usize) -> DataError {
        DataError::TokenOutOfRange {
            tokenizer: self.name(),
            token,
            index,
            vocab_size: self.vocab_size(),
        }
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer").field("kind", &self.kind()).finish()
    }
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind()
    }
}

impl Eq for Tokenizer {}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &[&str] = &[
        "Hello world",
        "",
        "To be, or not to be: that is the question.\n",
        "  leading and trailing spaces  ",
        "naïve café — ünïcödé, 日本語, emoji 🎭",
        "<|endoftext|> is plain text here",
    ];

    #[test]
    fn names_round_trip() {
        for name in ["bytes", "gpt2"] {
            let tok = Tokenizer::from_name(name).unwrap();
            assert_eq!(tok.name(), name);
            assert_eq!(TokenizerKind::from_name(name).unwrap().to_string(), name);
            assert_eq!(Tokenizer::new(tok.kind()).unwrap(), tok);
        }
        let err = Tokenizer::from_name("gpt3").unwrap_err();
        assert!(matches!(&err, DataError::UnknownTokenizer { name } if name == "gpt3"));
        assert!(err.to_string().contains("\"gpt3\""), "{err}");
    }

    #[test]
    fn kind_serde_uses_names() {
        assert_eq!(serde_json::to_string(&TokenizerKind::Gpt2).unwrap(), "\"gpt2\"");
        assert_eq!(
            serde_json::from_str::<TokenizerKind>("\"bytes\"").unwrap(),
            TokenizerKind::Bytes
        );
    }

    #[test]
    fn vocab_sizes_and_eot() {
        let bytes = Tokenizer::bytes();
        assert_eq!(bytes.vocab_size(), 256);
        assert_eq!(bytes.eot(), None);
        let gpt2 = Tokenizer::gpt2().unwrap();
        assert_eq!(gpt2.vocab_size(), 50257);
        assert_eq!(gpt2.eot(), Some(50256));
        assert_eq!(gpt2.decode(&[50256]).unwrap(), "<|endoftext|>");
    }

    #[test]
    fn bytes_round_trip() {
        let tok = Tokenizer::bytes();
        for s in SAMPLES {
            let ids = tok.encode(s);
            assert_eq!(ids.len(), s.len());
            assert!(ids.iter().all(|&t| t < 256));
            assert_eq!(tok.decode(&ids).unwrap(), *s);
        }
        assert_eq!(tok.encode("Hi"), vec![72, 105]);
    }

    #[test]
    fn gpt2_round_trip() {
        let tok = Tokenizer::gpt2().unwrap();
        for s in SAMPLES {
            let ids = tok.encode(s);
            assert!(ids.iter().all(|&t| (t as usize) < tok.vocab_size()));
            assert_eq!(tok.decode(&ids).unwrap(), *s);
        }
    }

    #[test]
    fn gpt2_known_encodings() {
        let tok = Tokenizer::gpt2().unwrap();
        assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
        assert_eq!(tok.encode(" the"), vec![262]);
        // Special-token text is not turned into the special token.
        assert!(!tok.encode("<|endoftext|>").contains(&Tokenizer::GPT2_EOT));
    }

    #[test]
    fn decode_is_lossy_on_split_characters() {
        let tok = Tokenizer::bytes();
        let ids = tok.encode("é"); // two bytes
        assert_eq!(tok.decode(&ids[..1]).unwrap(), "\u{fffd}");
    }

    #[test]
    fn decode_rejects_out_of_range_tokens() {
        let err = Tokenizer::bytes().decode(&[1, 2, 256]).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    token: 256,
                    index: 2,
                    vocab_size: 256,
                    tokenizer: "bytes"
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("token 256 at index 2"), "{err}");

        let err = Tokenizer::gpt2().unwrap().decode(&[15496, 50257]).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    token: 50257,
                    index: 1,
                    vocab_size: 50257,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
