//! The data layer: tokenizers, token sources and the training/validation loaders.
//!
//! - [`Tokenizer`] turns text into token ids and back (raw bytes, or GPT-2's BPE).
//! - [`load_tokens`] reads a UTF-8 text file or an llm.c token shard (`.bin`) into token ids;
//!   [`default_corpus`] is the embedded Shakespeare corpus used when no data is given.
//! - [`Split`] cuts a token stream into a training part and a validation part;
//!   [`DataLoader`] serves shuffled, seeded, resumable training batches from it and
//!   [`EvalBatches`] the fixed, sequential validation batches.
//!
//! Every fallible operation returns a [`DataError`] naming the file, value or size at fault.
#![warn(missing_docs)]

mod loader;
mod source;
mod tokenizer;

use std::path::PathBuf;

pub use loader::{Batch, DataLoader, EvalBatches, LoaderState, Split};
pub use source::{
    default_corpus, load_tokens, read_llmc_shard, read_text_tokens, write_llmc_shard, LLMC_HEADER_BYTES,
    LLMC_HEADER_INTS, LLMC_MAGIC, LLMC_VERSION,
};
pub use tokenizer::{Tokenizer, TokenizerKind};

/// Errors of the data layer. Each variant carries the path, value or size at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A tokenizer name other than `bytes` or `gpt2`.
    #[error("unknown tokenizer {name:?}: expected \"bytes\" or \"gpt2\"")]
    UnknownTokenizer {
        /// The name that was given.
        name: String,
    },

    /// The GPT-2 BPE tables embedded in the binary could not be loaded.
    #[error("cannot initialise the GPT-2 tokenizer: {reason}")]
    TokenizerInit {
        /// What went wrong.
        reason: String,
    },

    /// A token id outside the tokenizer's vocabulary was given to `decode`.
    #[error(
        "token {token} at index {index} is out of range for the {tokenizer} tokenizer (vocabulary size {vocab_size})"
    )]
    TokenOutOfRange {
        /// The tokenizer's name.
        tokenizer: &'static str,
        /// The offending token id.
        token: u32,
        /// Its position in the input.
        index: usize,
        /// The tokenizer's vocabulary size.
        vocab_size: usize,
    },

    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// `"read"` or `"write"`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A text file that is not valid UTF-8.
    #[error("{} is not valid UTF-8: invalid byte 0x{byte:02x} at byte offset {offset}", .path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        offset: usize,
        /// The value of that byte.
        byte: u8,
    },

    /// A file that yields no tokens (an empty text file, or a shard with a token count of 0).
    #[error("{} holds no tokens (it is empty)", .path.display())]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },

    /// A token shard shorter than its 1024-byte header.
    #[error("{} is not an llm.c token shard: it has {len} bytes, fewer than the {needed}-byte header", .path.display())]
    ShardTooShort {
        /// The file.
        path: PathBuf,
        /// The file's length in bytes.
        len: u64,
        /// The header's length in bytes.
        needed: u64,
    },

    /// A token shard whose header does not start with the llm.c magic number.
    #[error("{} is not an llm.c token shard: bad magic number, expected {expected} but found {found}", .path.display())]
    ShardBadMagic {
        /// The file.
        path: PathBuf,
        /// The magic number of llm.c token shards (20240520).
        expected: i32,
        /// The value found in the header.
        found: i32,
    },

    /// A token shard of a version this reader does not support.
    #[error("{}: unsupported llm.c token shard version {found} (supported: {supported})", .path.display())]
    ShardBadVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the header.
        found: i32,
        /// The only supported version.
        supported: i32,
    },

    /// A token shard whose header's token count does not match the file's size.
    #[error(
        "{}: header says {count} tokens, which needs a file of {expected_len} bytes, but the file has {len} bytes",
        .path.display()
    )]
    ShardBadCount {
        /// The file.
        path: PathBuf,
        /// The token count in the header.
        count: i64,
        /// The file size that count implies (0 when the count is negative).
        expected_len: u64,
        /// The file's actual size.
        len: u64,
    },

    /// A token in a shard that is outside the tokenizer's vocabulary.
    #[error("{}: token {token} at index {index} is out of range for the {tokenizer} tokenizer (vocabulary size {vocab_size})", .path.display())]
    ShardTokenOutOfRange {
        /// The file.
        path: PathBuf,
        /// The offending token.
        token: u16,
        /// Its index among the shard's tokens.
        index: usize,
        /// The tokenizer's name.
        tokenizer: &'static str,
        /// The tokenizer's vocabulary size.
        vocab_size: usize,
    },

    /// Too many tokens to fit an llm.c shard (its count is an `i32`).
    #[error("{}: {count} tokens do not fit in one llm.c shard (at most {max})", .path.display())]
    ShardTooLarge {
        /// The file.
        path: PathBuf,
        /// The number of tokens given.
        count: usize,
        /// The largest count a shard can hold.
        max: usize,
    },

    /// A batch size or sequence length of zero.
    #[error("{name} must be at least 1, got 0")]
    ZeroSize {
        /// `"batch"` or `"seq"`.
        name: &'static str,
    },

    /// A validation fraction outside (0, 1).
    #[error("validation fraction must be strictly between 0 and 1, got {value}")]
    InvalidValFraction {
        /// The value given.
        value: f64,
    },

    /// Too few tokens for one batch.
    #[error(
        "the {part} tokens are too few for one batch: {batch} sequences of {seq} tokens need {needed} tokens \
         (batch * seq + 1), but there are {have}"
    )]
    TooFewTokens {
        /// Which tokens: `"training"`, `"validation"` or `"loader"`.
        part: &'static str,
        /// The batch size.
        batch: usize,
        /// The sequence length.
        seq: usize,
        /// Tokens needed for one batch.
        needed: usize,
        /// Tokens available.
        have: usize,
    },

    /// A saved loader state that does not fit the loader it is resumed into.
    #[error("cannot resume loader: state cursor {cursor} is past the {windows} windows of an epoch")]
    InvalidState {
        /// The cursor in the saved state.
        cursor: u64,
        /// Windows per epoch of the loader being resumed.
        windows: usize,
    },
}
