//! Fuzzes the checkpoint loader (manifest JSON + safetensors + checksums + shape checks): a
//! valid tiny checkpoint is written once; each input replaces its manifest or one stage file
//! (with the manifest's checksum fixed up half the time, so parsing goes deeper). Loading must
//! return a checkpoint or an error, never panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use baton_engine::checkpoint;
use baton_engine::data::TokenizerKind;
use baton_engine::{Cpu, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn template() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("baton-fuzz-ckpt-{}", std::process::id()));
        let model = GptConfig { vocab_size: 7, max_seq: 4, layers: 1, d_model: 4, heads: 2 };
        let pipe = Pipeline::new(PipelineConfig::new(model, 2, ScheduleKind::OneFOneB, 1), vec![Cpu; 2]).expect("pipeline");
        checkpoint::save(&root, &pipe, TokenizerKind::Bytes, None).expect("save")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let src = template();
    let dir = std::env::temp_dir().join(format!("baton-fuzz-case-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for name in ["manifest.json", "stage-0.safetensors", "stage-1.safetensors"] {
        let _ = std::fs::copy(src.join(name), dir.join(name));
    }
    if selector % 3 == 0 {
        let _ = std::fs::write(dir.join("manifest.json"), body);
    } else {
        let file = if selector % 3 == 1 { "stage-0.safetensors" } else { "stage-1.safetensors" };
        let _ = std::fs::write(dir.join(file), body);
        if selector & 8 != 0 {
            // Fix the checksum and size so the loader parses the fuzzed file.
            if let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) {
                if let Ok(mut manifest) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(files) = manifest["files"].as_array_mut() {
                        for f in files.iter_mut().filter(|f| f["name"] == file) {
                            f["sha256"] = serde_json::json!(format!("{:x}", Sha256::digest(body)));
                            f["bytes"] = serde_json::json!(body.len());
                        }
                    }
                    let _ = std::fs::write(dir.join("manifest.json"), manifest.to_string());
                }
            }
        }
    }
    let _ = checkpoint::load(&dir);
});
