//! TensorBoard scalar event files (`events.out.tfevents.*`), written without TensorFlow: TFRecord framing (length,
//! masked CRC-32C of the length, the serialized `Event`, masked CRC-32C of it) around `Event` / `Summary`
//! messages encoded with `prost`, with only the fields a scalar needs (field numbers as in TensorFlow's
//! `event.proto` and `summary.proto`). [`read_events`] reads such a file back, checking every CRC.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

/// `tensorflow.Event`, the fields a scalar log uses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `brain.Event:2` in a file's first record.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// The values.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// One value per tag.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The tag (`train/loss`).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's CRC mask: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes one event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it (`events.out.tfevents.<unix time>.baton.<pid>`), starting with
    /// the file-version record TensorBoard expects.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = crate::engine::trainer::unix_time_s();
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.baton.{}",
            now as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut w = EventWriter {
            file: BufWriter::new(file),
            path,
        };
        w.write(&Event {
            wall_time: now,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one framed record.
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(&data)?;
        self.file.write_all(&masked_crc(&data).to_le_bytes())
    }

    /// Appends a scalar `value` under `tag` at `step`, stamped now.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> std::io::Result<()> {
        self.write(&Event {
            wall_time: crate::engine::trainer::unix_time_s(),
            step,
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.into(),
                    simple_value: Some(value),
                }],
            }),
        })
    }

    /// Flushes to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Reads every record of an event file, checking both CRCs of each; an error names the record and what is wrong.
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let record = events.len();
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| format!("record {record}: truncated header"))?;
        let (len_bytes, crc_bytes) = header.split_at(8);
        let len_arr: [u8; 8] = len_bytes.try_into().map_err(|_| "header".to_string())?;
        let crc_arr: [u8; 4] = crc_bytes.try_into().map_err(|_| "header".to_string())?;
        if masked_crc(len_bytes) != u32::from_le_bytes(crc_arr) {
            return Err(format!("record {record}: length CRC mismatch"));
        }
        let len = usize::try_from(u64::from_le_bytes(len_arr)).map_err(|_| format!("record {record}: length"))?;
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| format!("record {record}: truncated data"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .ok_or_else(|| format!("record {record}: truncated data CRC"))?;
        if masked_crc(data) != u32::from_le_bytes(crc) {
            return Err(format!("record {record}: data CRC mismatch"));
        }
        events.push(Event::decode(data).map_err(|e| format!("record {record}: {e}"))?);
        at += 16 + len;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASKED_ZERO_LEN: u32 = 0x0798_0329;

    #[test]
    fn crc32c_and_the_tfrecord_mask_match_published_values() {
        // CRC-32C check value (RFC 3720): "123456789" -> 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // Eight zero bytes (an empty record's length field), computed independently with a bitwise CRC-32C in
        // Python: crc 0x8C28B28A, masked as TensorFlow's `masked_crc32c` does.
        assert_eq!(crc32c::crc32c(&[0u8; 8]), 0x8C28_B28A);
        assert_eq!(masked_crc(&[0u8; 8]), MASKED_ZERO_LEN);
    }

    #[test]
    fn scalars_read_back_with_their_crcs_checked_and_a_flipped_bit_is_caught() {
        let dir = std::env::temp_dir().join(format!("baton-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        for step in 1..=5 {
            w.scalar("train/loss", step, 1.0 / step as f32).unwrap();
        }
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 6);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let losses: Vec<(i64, f32)> = events[1..]
            .iter()
            .map(|e| {
                let v = &e.summary.as_ref().unwrap().value[0];
                assert_eq!(v.tag, "train/loss");
                (e.step, v.simple_value.unwrap())
            })
            .collect();
        assert_eq!(losses[4], (5, 0.2));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_events(&path).unwrap_err().contains("CRC mismatch"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
