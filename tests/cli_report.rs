//! The run report and the SVG timeline, rendered in headless Chromium (Debian's `chromium`, which
//! `scripts/test.sh` installs): each page loads without console errors, from no network, and its screenshot shows
//! the drawings (not a blank page). Screenshots go to `target/ux-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::baton;

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Screenshots `page` (a file) at `width`×`height`; returns the PNG path and Chromium's log.
fn screenshot(browser: &Path, page: &Path, name: &str, width: u32, height: u32) -> (PathBuf, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ux-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&png);
    let profile = std::env::temp_dir().join(format!("baton-chromium-{}-{name}", std::process::id()));
    // Bounded: a browser that hangs ends the test with its log instead of holding it forever (coreutils `timeout`
    // kills it after 120 s).
    let out = Command::new("timeout")
        .arg("120")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            // Nothing may come from the network: every request but the file itself fails.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--window-size={width},{height}"),
            &format!("--screenshot={}", png.display()),
            &format!("file://{}", page.display()),
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(out.status.success() && png.exists(), "chromium failed: {log}");
    (png, log)
}

/// (pixels that are not the background, distinct colours) in the PNG.
fn ink(png: &Path) -> (usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let background = px[0].to_vec();
    let inked = px.iter().filter(|p| p[..3] != background[..3]).count();
    let colours: std::collections::BTreeSet<[u8; 3]> = px.iter().map(|p| [p[0], p[1], p[2]]).collect();
    (inked, colours.len())
}

/// Console errors and failed loads in Chromium's log.
fn page_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("CONSOLE") || l.contains("Uncaught") || l.contains("Failed to load") || l.contains("ERR_")
        })
        .collect()
}

fn browser_or_skip(what: &str) -> Option<PathBuf> {
    match chromium() {
        Some(b) => Some(b),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{what}: no Chromium at /usr/bin/chromium; scripts/test.sh installs it (apt-get install chromium)")
        }
        None => {
            eprintln!("SKIPPED {what}: no Chromium at /usr/bin/chromium (scripts/test.sh installs it)");
            None
        }
    }
}

#[test]
fn the_run_report_renders_in_headless_chromium_with_its_curves() {
    let Some(browser) = browser_or_skip("the run report") else {
        return;
    };
    let out = std::env::temp_dir().join(format!("baton-cli-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut args = common::tiny_with(&[
        "--stages",
        "2",
        "--steps",
        "12",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
    ]);
    args.extend(["--out", out.to_str().unwrap()]);
    let run = baton(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let html_path = out.join("report.html");
    let html = std::fs::read_to_string(&html_path).unwrap();
    // Self-contained: no scripts, no links, nothing fetched (the SVG namespace is a name, not a request).
    for bad in ["<script", "src=", "href=", "https://", "<link", "@import"] {
        assert!(!html.contains(bad), "report.html holds `{bad}`");
    }
    for id in [
        "chart-loss",
        "chart-tokens",
        "chart-lr",
        "chart-grad-norm",
        "chart-busy",
        "timeline",
        "config",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "no #{id}");
    }
    assert!(html.contains("validation loss") && html.contains("stage 1 busy") && html.contains("bubble"));
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(
        svg.contains("<polyline") || svg.contains("<path"),
        "loss.svg has no curve"
    );
    // `baton report` writes the same from the run directory.
    std::fs::remove_file(&html_path).unwrap();
    let again = baton(&["report", out.to_str().unwrap()]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read_to_string(&html_path).unwrap(), html);
    let (png, log) = screenshot(&browser, &html_path, "report", 1600, 2000);
    assert!(page_errors(&log).is_empty(), "console errors: {:?}", page_errors(&log));
    let (inked, colours) = ink(&png);
    assert!(
        inked > 100_000 && colours > 50,
        "the screenshot looks blank: {inked} inked pixels, {colours} colours"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn the_svg_timeline_renders_in_headless_chromium_with_axis_legend_and_chunks() {
    let Some(browser) = browser_or_skip("the SVG timeline") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("baton-cli-timeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, args) in [
        ("timeline-zb-v-p4-m8", ["zb-v", "4", "8"]),
        ("timeline-1f1b-p8-m32", ["1f1b", "8", "32"]),
    ] {
        let path = dir.join(format!("{name}.svg"));
        let out = baton(&[
            "schedule",
            "--schedule",
            args[0],
            "--stages",
            args[1],
            "--microbatches",
            args[2],
            "--format",
            "svg",
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("time (time units)"), "{name}: no axis");
        if args[0] == "zb-v" {
            assert!(
                svg.contains("forward (F), chunk 1") && svg.contains(">F0.1<"),
                "{name}: chunks not told apart"
            );
            assert!(
                !svg.contains("backward (B)"),
                "{name}: lists a kind that does not occur"
            );
        } else {
            assert!(!svg.contains("input grad"), "{name}: lists a kind that does not occur");
            let width: f64 = svg
                .split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                width > 1500.0,
                "{name}: {width} px is too narrow for 8 × 32 labelled actions (the old fixed width was 1200)"
            );
            assert!(
                svg.contains(">F31<") && svg.contains(">B31<"),
                "{name}: labels vanished"
            );
        }
        let (png, log) = screenshot(&browser, &path, name, 1400, 420);
        assert!(page_errors(&log).is_empty(), "{name}: {:?}", page_errors(&log));
        let (inked, colours) = ink(&png);
        assert!(
            inked > 50_000 && colours > 20,
            "{name}: looks blank ({inked} inked, {colours} colours)"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
