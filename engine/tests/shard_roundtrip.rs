//! Property test: llm.c token shards round-trip through the writer and reader.

use baton_engine::data::{read_llmc_shard, write_llmc_shard, Tokenizer};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn shard_write_then_read_is_the_identity(tokens in prop::collection::vec(0u16..256, 1..2000)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        write_llmc_shard(&path, &tokens).unwrap();
        let back = read_llmc_shard(&path, &Tokenizer::bytes()).unwrap();
        prop_assert_eq!(back, tokens.iter().map(|&t| u32::from(t)).collect::<Vec<_>>());
    }

    /// Arbitrary bytes never panic the reader: they load or give an error.
    #[test]
    fn arbitrary_bytes_never_panic_the_shard_reader(bytes in prop::collection::vec(any::<u8>(), 0..4096), magic in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let mut bytes = bytes;
        if magic && bytes.len() >= 12 {
            bytes[..4].copy_from_slice(&20240520i32.to_le_bytes());
            bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = read_llmc_shard(&path, &Tokenizer::gpt2().unwrap());
    }
}
