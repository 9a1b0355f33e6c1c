//! Compiles `proto/tollgate/v1` with protox (no `protoc` needed) and prepares
//! the descriptor sets that gRPC server reflection serves: ours, and the
//! subset of Envoy's that covers ext_authz and the rate limit service, taken
//! from the descriptor set shipped inside the `envoy-types` crate.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::{env, fs};

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};

const ENVOY_SERVICES: &[&str] = &[
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/ratelimit/v3/rls.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(["tollgate/v1/decision.proto"], ["proto"])?;
    fs::write(out.join("tollgate_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let envoy_set = find_envoy_types_descriptors()?;
    let bytes = fs::read(&envoy_set)?;
    let full = FileDescriptorSet::decode(bytes.as_slice())?;
    let subset = closure(&full, ENVOY_SERVICES)?;
    fs::write(out.join("envoy_descriptor.bin"), subset.encode_to_vec())?;
    Ok(())
}

/// Keeps only the files the two Envoy services need, transitively.
fn closure(
    full: &FileDescriptorSet,
    roots: &[&str],
) -> Result<FileDescriptorSet, Box<dyn std::error::Error>> {
    let by_name: HashMap<&str, &FileDescriptorProto> =
        full.file.iter().map(|f| (f.name(), f)).collect();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    let mut stack: Vec<&str> = roots.to_vec();
    while let Some(name) = stack.pop() {
        if !seen.insert(name.to_string()) {
            continue;
        }
        let file = by_name
            .get(name)
            .ok_or_else(|| format!("envoy-types descriptor set lacks {name}"))?;
        order.push((*file).clone());
        stack.extend(file.dependency.iter().map(String::as_str));
    }
    Ok(FileDescriptorSet { file: order })
}

/// Locates `src/generated/types.bin` of the `envoy-types` version in
/// Cargo.lock. `ENVOY_TYPES_DIR` overrides the search (vendored builds).
fn find_envoy_types_descriptors() -> Result<PathBuf, Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_DIR");
    if let Ok(dir) = env::var("ENVOY_TYPES_DIR") {
        return Ok(Path::new(&dir).join("src/generated/types.bin"));
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let lock = fs::read_to_string(manifest.join("Cargo.lock"))?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .ok_or("envoy-types not found in Cargo.lock")?;
    let cargo_home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let mut candidates = vec![manifest.join(format!("vendor/envoy-types-{version}"))];
    if let Ok(entries) = fs::read_dir(cargo_home.join("registry/src")) {
        for entry in entries.flatten() {
            candidates.push(entry.path().join(format!("envoy-types-{version}")));
        }
    }
    candidates
        .into_iter()
        .map(|dir| dir.join("src/generated/types.bin"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!("cannot find envoy-types {version} sources; set ENVOY_TYPES_DIR").into()
        })
}
