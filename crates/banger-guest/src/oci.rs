//! OCI images for `banger image import`: an OCI image layout (`index.json`,
//! `blobs/<alg>/<hex>`; what `skopeo copy ... oci:DIR` and `docker save`
//! since Docker 25 write) or a classic `docker save` archive
//! (`manifest.json` listing `<id>/layer.tar`s). The linux/amd64 manifest's
//! layers are applied in order onto an empty tree, whiteouts included
//! (`.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties
//! its directory), as the OCI image spec's layer changesets say.
//!
//! The index, manifests and layer paths come from the image: digests are
//! checked for form, and every file is resolved inside the layout dir.

use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, MediaType, Os};
use serde::Deserialize;
use thiserror::Error;

use crate::import::{self, ImportError};
use crate::tree;

/// The prefix of a whiteout entry's name.
pub(crate) const WHITEOUT: &str = ".wh.";
/// The name of an opaque-directory whiteout.
const OPAQUE: &str = ".wh..wh..opq";
/// How deep nested indexes may go.
const MAX_INDEX_DEPTH: u32 = 4;

#[derive(Debug, Error)]
pub enum OciError {
    #[error("OCI image {dir}: {what}")]
    Layout { dir: PathBuf, what: String },
    #[error("OCI image {dir}: layer {layer}: {source}")]
    Layer {
        dir: PathBuf,
        layer: String,
        source: Box<ImportError>,
    },
}

/// An OCI image layout: the linux/amd64 image of its index, unpacked.
pub fn unpack_layout(
    dir: &Path,
    rootfs: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<(), OciError> {
    let bad = |what: String| OciError::Layout {
        dir: dir.to_path_buf(),
        what,
    };
    let index_path = inside(dir, "index.json")?;
    let index = ImageIndex::from_file(&index_path).map_err(|e| bad(format!("index.json: {e}")))?;
    let manifest = pick_manifest(dir, index.manifests(), 0)?;
    let layers: Vec<String> = manifest
        .layers()
        .iter()
        .map(|l| blob_path(dir, l))
        .collect::<Result<_, _>>()?;
    apply_layers(dir, &layers, rootfs, progress)
}

/// The manifest for linux/amd64 among `descs` (an index's), following
/// nested indexes.
fn pick_manifest(dir: &Path, descs: &[Descriptor], depth: u32) -> Result<ImageManifest, OciError> {
    let bad = |what: String| OciError::Layout {
        dir: dir.to_path_buf(),
        what,
    };
    if depth > MAX_INDEX_DEPTH {
        return Err(bad(format!(
            "indexes nested more than {MAX_INDEX_DEPTH} deep"
        )));
    }
    let fits = |d: &&Descriptor| {
        d.platform()
            .as_ref()
            .is_none_or(|p| *p.architecture() == Arch::Amd64 && *p.os() == Os::Linux)
    };
    let Some(desc) = descs.iter().find(fits) else {
        return Err(bad(
            "no linux/amd64 image in it (banger guests are x86_64 Linux)".into(),
        ));
    };
    let path = inside(dir, &blob_path(dir, desc)?)?;
    let is_index = match desc.media_type() {
        MediaType::ImageIndex => true,
        MediaType::Other(t) => t.contains("manifest.list"),
        _ => false,
    };
    if is_index {
        let index =
            ImageIndex::from_file(&path).map_err(|e| bad(format!("{}: {e}", desc.digest())))?;
        return pick_manifest(dir, index.manifests(), depth + 1);
    }
    ImageManifest::from_file(&path).map_err(|e| bad(format!("manifest {}: {e}", desc.digest())))
}

/// `blobs/<algorithm>/<hex>` of a descriptor, relative to the layout,
/// after checking the digest has no characters a path could abuse.
fn blob_path(dir: &Path, d: &Descriptor) -> Result<String, OciError> {
    let alg = d.digest().algorithm().to_string();
    let hex = d.digest().digest();
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
            && !s.starts_with('.')
    };
    if !plain(&alg) || !plain(hex) {
        return Err(OciError::Layout {
            dir: dir.to_path_buf(),
            what: format!(
                "digest {:?} is not of the form ALGORITHM:HEX",
                d.digest().to_string()
            ),
        });
    }
    Ok(format!("blobs/{alg}/{hex}"))
}

/// `docker save` output: its `manifest.json` names one image's layer tars.
pub fn unpack_docker(
    dir: &Path,
    rootfs: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<(), OciError> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let bad = |what: String| OciError::Layout {
        dir: dir.to_path_buf(),
        what,
    };
    let path = inside(dir, "manifest.json")?;
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let entries: Vec<Entry> =
        serde_json::from_str(&text).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let [entry] = entries.as_slice() else {
        return Err(bad(format!(
            "manifest.json lists {} images: `docker save` one image",
            entries.len()
        )));
    };
    apply_layers(dir, &entry.layers, rootfs, progress)
}

/// A path of the layout, resolved inside it (a symlink in a hostile archive
/// cannot make banger read a host file as a layer).
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, OciError> {
    tree::resolve(dir, Path::new(rel)).map_err(|e| OciError::Layout {
        dir: dir.to_path_buf(),
        what: format!("{rel}: {e}"),
    })
}

fn apply_layers(
    dir: &Path,
    layers: &[String],
    rootfs: &Path,
    progress: &mut crate::Progress<'_>,
) -> Result<(), OciError> {
    std::fs::create_dir_all(rootfs).map_err(|e| OciError::Layout {
        dir: dir.to_path_buf(),
        what: format!("{}: {e}", rootfs.display()),
    })?;
    let mut skipped = 0;
    for (i, layer) in layers.iter().enumerate() {
        crate::line(
            progress,
            &format!("layer {}/{}: {layer}", i + 1, layers.len()),
        );
        let path = inside(dir, layer)?;
        let failed = |source: ImportError| OciError::Layer {
            dir: dir.to_path_buf(),
            layer: layer.clone(),
            source: Box::new(source),
        };
        // Whiteouts first: they remove what the layers below left, never
        // what this layer adds (the spec's rule), whatever their order in
        // the tar.
        for w in whiteouts(&path).map_err(failed)? {
            remove_whited_out(rootfs, &w).map_err(|source| {
                failed(ImportError::Io {
                    path: rootfs.join(&w),
                    source,
                })
            })?;
        }
        let what = format!("layer {}/{}", i + 1, layers.len());
        skipped += import::unpack_file(&path, rootfs, true, &what, progress).map_err(failed)?;
    }
    if skipped > 0 {
        crate::line(
            progress,
            &format!(
                "skipped {skipped} device node(s) and fifo(s): a banger guest's /dev is devtmpfs"
            ),
        );
    }
    Ok(())
}

/// The whiteout entries of a layer tar (plain or gzip), as tree paths.
pub(crate) fn whiteouts(layer: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let io = |source| ImportError::Io {
        path: layer.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(layer).map_err(io)?;
    let mut r = std::io::BufReader::new(f);
    let gz = std::io::BufRead::fill_buf(&mut r)
        .map_err(io)?
        .starts_with(&[0x1f, 0x8b]);
    let list = |rd: &mut dyn std::io::Read| -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in tar::Archive::new(rd).entries()? {
            let p = e?.path()?.into_owned();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(WHITEOUT))
            {
                out.push(p);
            }
        }
        Ok(out)
    };
    if gz {
        list(&mut flate2::read::GzDecoder::new(r)).map_err(io)
    } else {
        list(&mut r).map_err(io)
    }
}

/// Applies one whiteout: `dir/.wh..wh..opq` empties `dir`, `dir/.wh.NAME`
/// removes `dir/NAME`. The directory is resolved inside the tree, so a
/// whiteout under a symlink never removes anything of the host.
pub(crate) fn remove_whited_out(root: &Path, w: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (w.parent(), w.file_name()) else {
        return Ok(());
    };
    let name = name.to_string_lossy();
    let dir = tree::resolve(root, parent)?;
    if !dir.starts_with(root) {
        return Err(std::io::Error::other("whiteout outside the tree"));
    }
    let remove = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if name == OPAQUE {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries {
                remove(&e?.path())?;
            }
        }
        return Ok(());
    }
    let target = &name[WHITEOUT.len()..];
    if target.is_empty() || target == "." || target == ".." || target.contains('/') {
        return Ok(());
    }
    remove(&dir.join(target))
}
