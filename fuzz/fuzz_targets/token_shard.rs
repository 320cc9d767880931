//! Fuzzes the llm.c token-shard reader: any bytes load or give an error, never a panic.
#![no_main]

use baton_engine::data::{read_llmc_shard, Tokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("baton-fuzz-shard-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.bin");
    let mut bytes = data.to_vec();
    // Half the inputs get a valid magic and version so the reader goes past the header.
    if bytes.first().is_some_and(|b| b & 1 == 1) && bytes.len() >= 12 {
        bytes[..4].copy_from_slice(&20240520i32.to_le_bytes());
        bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
    }
    if std::fs::write(&path, &bytes).is_ok() {
        let _ = read_llmc_shard(&path, &Tokenizer::bytes());
    }
});
