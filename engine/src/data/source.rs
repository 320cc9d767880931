//! Token sources: UTF-8 text files, llm.c token shards, and the embedded default corpus.
//!
//! An llm.c token shard (`.bin`) is a header of 256 little-endian `i32`s — `[0]` the magic
//! number 20240520, `[1]` the version 1, `[2]` the token count, the rest zero — followed by
//! `count` little-endian `u16` tokens.

use std::path::Path;

use super::{DataError, Tokenizer};

/// Magic number in the first header word of an llm.c token shard.
pub const LLMC_MAGIC: i32 = 20240520;
/// The llm.c token shard version this crate reads and writes.
pub const LLMC_VERSION: i32 = 1;
/// Number of `i32` words in an llm.c shard header.
pub const LLMC_HEADER_INTS: usize = 256;
/// Size of an llm.c shard header in bytes.
pub const LLMC_HEADER_BYTES: usize = LLMC_HEADER_INTS * 4;

/// The embedded default corpus: Shakespeare plays (public domain, Project Gutenberg texts,
/// boilerplate stripped), about 1.8 MB of plain UTF-8 text. See `engine/corpus/README.md`.
pub fn default_corpus() -> &'static str {
    include_str!("../../corpus/shakespeare.txt")
}

/// Reads `path` and tokenizes it: an llm.c token shard if its extension is `.bin`
/// (any case), UTF-8 text otherwise.
pub fn load_tokens(path: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let path = path.as_ref();
    let is_shard = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("bin"));
    if is_shard {
        read_llmc_shard(path, tokenizer)
    } else {
        read_text_tokens(path, tokenizer)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a UTF-8 text file and encodes it with `tokenizer`.
///
/// Errors if the file cannot be read, is empty, or is not valid UTF-8 (naming the byte offset
/// of the first invalid byte).
pub fn read_text_tokens(path: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    if bytes.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let offset = e.valid_up_to();
        DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            offset,
            byte: bytes.get(offset).copied().unwrap_or(0),
        }
    })?;
    Ok(tokenizer.encode(text))
}

fn header_word(bytes: &[u8], index: usize) -> i32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[index * 4..index * 4 + 4]);
    i32::from_le_bytes(word)
}

/// Reads an llm.c token shard, checking its header and that every token is below
/// `tokenizer`'s vocabulary size.
pub fn read_llmc_shard(path: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let len = bytes.len() as u64;
    if bytes.len() < LLMC_HEADER_BYTES {
        return Err(DataError::ShardTooShort {
            path: path.to_path_buf(),
            len,
            needed: LLMC_HEADER_BYTES as u64,
        });
    }
    let magic = header_word(&bytes, 0);
    if magic != LLMC_MAGIC {
        return Err(DataError::ShardBadMagic {
            path: path.to_path_buf(),
            expected: LLMC_MAGIC,
            found: magic,
        });
    }
    let version = header_word(&bytes, 1);
    if version != LLMC_VERSION {
        return Err(DataError::ShardBadVersion {
            path: path.to_path_buf(),
            found: version,
            supported: LLMC_VERSION,
        });
    }
    let count = header_word(&bytes, 2);
    let expected_len = u64::try_from(count).map_or(0, |c| LLMC_HEADER_BYTES as u64 + 2 * c);
    if count < 0 || expected_len != len {
        return Err(DataError::ShardBadCount {
            path: path.to_path_buf(),
            count: i64::from(count),
            expected_len,
            len,
        });
    }
    if count == 0 {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let vocab_size = tokenizer.vocab_size();
    let mut tokens = Vec::with_capacity(bytes.len() / 2);
    for (index, pair) in bytes[LLMC_HEADER_BYTES..].chunks_exact(2).enumerate() {
        let token = u16::from_le_bytes([pair[0], pair[1]]);
        if usize::from(token) >= vocab_size {
            return Err(DataError::ShardTokenOutOfRange {
                path: path.to_path_buf(),
                token,
                index,
                tokenizer: tokenizer.name(),
                vocab_size,
            });
        }
        tokens.push(u32::from(token));
    }
    Ok(tokens)
}

/// Writes `tokens` as an llm.c token shard (version 1) at `path`, replacing any file there.
pub fn write_llmc_shard(path: impl AsRef<Path>, tokens: &[u16]) -> Result<(), DataError> {
    let path = path.as_ref();
    let max = i32::MAX as usize;
    let count = i32::try_from(tokens.len()).map_err(|_| DataError::ShardTooLarge {
        path: path.to_path_buf(),
        count: tokens.len(),
        max,
    })?;
    let mut header = [0i32; LLMC_HEADER_INTS];
    header[0] = LLMC_MAGIC;
    header[1] = LLMC_VERSION;
    header[2] = count;
    let mut bytes = Vec::with_capacity(LLMC_HEADER_BYTES + 2 * tokens.len());
    for word in header {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    for &token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|source| DataError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn shard_bytes(magic: i32, version: i32, count: i32, tokens: &[u16]) -> Vec<u8> {
        let mut header = [0i32; LLMC_HEADER_INTS];
        header[0] = magic;
        header[1] = version;
        header[2] = count;
        let mut bytes: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
        bytes
    }

    #[test]
    fn default_corpus_is_small_nonempty_and_tokenizes() {
        let corpus = default_corpus();
        assert!(!corpus.is_empty());
        assert!(corpus.len() <= 2 * 1024 * 1024, "corpus is {} bytes", corpus.len());
        assert!(corpus.len() >= 1_000_000, "corpus is {} bytes", corpus.len());
        assert!(!corpus.to_lowercase().contains("gutenberg"));
        assert!(!corpus.contains('\r'));
        assert!(corpus.starts_with("ALL'S WELL THAT ENDS WELL"));

        let bytes = Tokenizer::bytes();
        assert_eq!(bytes.encode(corpus).len(), corpus.len());

        // GPT-2 BPE is slow in debug builds: tokenize a prefix (on a line boundary) and check it round-trips.
        let gpt2 = Tokenizer::gpt2().unwrap();
        let end = corpus[..50_000].rfind('\n').unwrap() + 1;
        let prefix = &corpus[..end];
        let ids = gpt2.encode(prefix);
        assert!(ids.len() > 5_000 && ids.len() < prefix.len(), "{} tokens", ids.len());
        assert_eq!(gpt2.decode(&ids).unwrap(), prefix);
    }

    #[test]
    fn text_file_tokenizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "a.txt", "Hello world".as_bytes());
        assert_eq!(
            read_text_tokens(&path, &Tokenizer::gpt2().unwrap()).unwrap(),
            vec![15496, 995]
        );
        assert_eq!(
            load_tokens(&path, &Tokenizer::bytes()).unwrap(),
            "Hello world".bytes().map(u32::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn text_file_not_utf8_names_path_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "bad.txt", b"hello\xffworld");
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(&err, DataError::InvalidUtf8 { offset: 5, byte: 0xff, path: p } if *p == path),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("offset 5") && msg.contains("0xff"),
            "{msg}"
        );

        // A truncated multi-byte character at the end.
        let path = write(&dir, "cut.txt", &"abé".as_bytes()[..3]);
        let err = read_text_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::InvalidUtf8 {
                    offset: 2,
                    byte: 0xc3,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn empty_text_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "empty.txt", b"");
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(&err, DataError::EmptyFile { path: p } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("empty.txt"), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["missing.txt", "missing.bin"] {
            let path = dir.path().join(name);
            let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
            assert!(matches!(err, DataError::Io { action: "read", .. }), "{err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn shard_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.bin");
        let tokens: Vec<u16> = (0..5000u32).map(|i| ((i * 7919) % 50257) as u16).collect();
        write_llmc_shard(&path, &tokens).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), LLMC_HEADER_BYTES + 2 * tokens.len());
        assert_eq!(&bytes[..4], &20240520i32.to_le_bytes());
        assert_eq!(&bytes[4..8], &1i32.to_le_bytes());
        assert_eq!(&bytes[8..12], &5000i32.to_le_bytes());
        assert!(bytes[12..LLMC_HEADER_BYTES].iter().all(|&b| b == 0));
        assert_eq!(
            &bytes[LLMC_HEADER_BYTES..LLMC_HEADER_BYTES + 2],
            &tokens[0].to_le_bytes()
        );

        let gpt2 = Tokenizer::gpt2().unwrap();
        let read = load_tokens(&path, &gpt2).unwrap();
        assert_eq!(read, tokens.iter().map(|&t| u32::from(t)).collect::<Vec<_>>());
        // Upper-case extension is a shard too.
        let upper = write(&dir, "TOKENS.BIN", &bytes);
        assert_eq!(load_tokens(&upper, &gpt2).unwrap(), read);
    }

    #[test]
    fn shard_shorter_than_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "short.bin", &[0u8; 100]);
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(&err, DataError::ShardTooShort { len: 100, needed: 1024, path: p } if *p == path),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("short.bin") && msg.contains("100 bytes"), "{msg}");
    }

    #[test]
    fn shard_bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "magic.bin", &shard_bytes(12345, 1, 2, &[1, 2]));
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardBadMagic {
                    expected: 20240520,
                    found: 12345,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("magic.bin") && msg.contains("expected 20240520 but found 12345"),
            "{msg}"
        );
    }

    #[test]
    fn shard_bad_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "version.bin", &shard_bytes(LLMC_MAGIC, 7, 2, &[1, 2]));
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardBadVersion {
                    found: 7,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("version.bin") && msg.contains("version 7"), "{msg}");
    }

    #[test]
    fn shard_count_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        // Header claims 3 tokens, file holds 2.
        let path = write(&dir, "count.bin", &shard_bytes(LLMC_MAGIC, 1, 3, &[1, 2]));
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardBadCount {
                    count: 3,
                    expected_len: 1030,
                    len: 1028,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("count.bin") && msg.contains("3 tokens") && msg.contains("1028 bytes"),
            "{msg}"
        );

        // Negative count.
        let path = write(&dir, "neg.bin", &shard_bytes(LLMC_MAGIC, 1, -1, &[1, 2]));
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(matches!(err, DataError::ShardBadCount { count: -1, .. }), "{err:?}");

        // Odd trailing byte.
        let mut bytes = shard_bytes(LLMC_MAGIC, 1, 2, &[1, 2]);
        bytes.push(0);
        let path = write(&dir, "odd.bin", &bytes);
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardBadCount {
                    count: 2,
                    len: 1029,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn shard_with_no_tokens_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.bin");
        write_llmc_shard(&path, &[]).unwrap();
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(matches!(err, DataError::EmptyFile { .. }), "{err:?}");
    }

    #[test]
    fn shard_token_out_of_vocab() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.bin");
        write_llmc_shard(&path, &[10, 255, 256, 3]).unwrap();
        let err = load_tokens(&path, &Tokenizer::bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardTokenOutOfRange {
                    token: 256,
                    index: 2,
                    vocab_size: 256,
                    tokenizer: "bytes",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("vocab.bin") && msg.contains("token 256 at index 2"),
            "{msg}"
        );
        // The same shard is fine for GPT-2; 50257 is not.
        assert_eq!(
            load_tokens(&path, &Tokenizer::gpt2().unwrap()).unwrap(),
            vec![10, 255, 256, 3]
        );
        write_llmc_shard(&path, &[50256, 50257]).unwrap();
        let err = load_tokens(&path, &Tokenizer::gpt2().unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::ShardTokenOutOfRange {
                    token: 50257,
                    index: 1,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn write_to_unwritable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no_such_dir").join("x.bin");
        let err = write_llmc_shard(&path, &[1]).unwrap_err();
        assert!(matches!(err, DataError::Io { action: "write", .. }), "{err:?}");
        assert!(err.to_string().contains("x.bin"), "{err}");
    }
}
