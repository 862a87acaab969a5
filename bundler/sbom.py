"""Stage: a CycloneDX SBOM of what the bundle ships, written with cyclonedx-python-lib.

One component per wheel (purl ``pkg:pypi/<name>@<version>?file_name=...``, sha256), one
per model file (type ``machine-learning-model``: repo, commit, path, sha256, licence), and
one per program the bundle runs on the host (``runtime/diarize.py``, ``install.sh``, ...).
Deterministic like the rest of the bundle: the serial number is derived from the shipped
hashes and the timestamp is the build's SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, XsUri
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

HUB = "https://huggingface.co"


def sbom_json(manifest: Mapping[str, Any]) -> bytes:
    """The SBOM for a bundle, from its manifest (wheels, models, build time, tool)."""
    digest = hashlib.sha256()
    for w in manifest["wheels"]:
        digest.update(f"{w['filename']} {w['sha256']}\n".encode())
    for m in manifest["models"]:
        for f in m["files"]:
            digest.update(f"{m['repo']}@{m['commit']}/{f['path']} {f['sha256']}\n".encode())
    for prog in manifest.get("programs", []):
        digest.update(f"{prog['path']} {prog['sha256']}\n".encode())
    bom = Bom(serial_number=uuid.UUID(bytes=digest.digest()[:16], version=5))
    bom.metadata.timestamp = datetime.fromtimestamp(manifest["build"]["source_date_epoch"],
                                                    UTC)
    root = bom.metadata.component = Component(
        type=ComponentType.APPLICATION, name=manifest["bundle"],
        version=str(manifest.get("pyannote_audio", "")), bom_ref=f"bundle:{manifest['bundle']}",
        description=f"pyannote-bundle {manifest['tool']['version']} bundle of recipe "
                    f"{manifest['recipe']['name']} for {manifest['target']['slug']}")
    for w in manifest["wheels"]:
        purl = PackageURL("pypi", name=w["name"], version=w["version"],
                          qualifiers={"file_name": w["filename"]})
        declared = w.get("license")
        bom.components.add(Component(
            type=ComponentType.LIBRARY, name=w["name"], version=w["version"], purl=purl,
            bom_ref=purl.to_string(), hashes=[HashType(alg=HashAlgorithm.SHA_256,
                                                       content=w["sha256"])],
            licenses=[DisjunctiveLicense(name=declared)] if declared else []))
    for m in manifest["models"]:
        licence = str(m.get("license") or "unknown")
        licences = [] if licence == "unknown" else [DisjunctiveLicense(id=licence)]
        for f in m["files"]:
            bom.components.add(Component(
                type=ComponentType.MACHINE_LEARNING_MODEL, group=m["repo"].split("/")[0],
                name=f"{m['repo'].split('/', 1)[1]}/{f['path']}", version=m["commit"],
                bom_ref=f"hf:{m['repo']}@{m['commit']}/{f['path']}",
                description=f"{f['bundle_path']} ({f['size']} bytes)",
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=f["sha256"])],
                licenses=licences,
                external_references=[ExternalReference(
                    type=ExternalReferenceType.DISTRIBUTION,
                    url=XsUri(f"{HUB}/{m['repo']}/blob/{m['commit']}/{f['path']}"))]))
    for prog in manifest.get("programs", []):
        # The code that runs on the isolated host (bin/diarize, the installer): ours, pinned
        # by its sha256 like every wheel.
        bom.components.add(Component(
            type=ComponentType.APPLICATION, name=prog["path"],
            version=manifest["tool"]["version"], bom_ref=f"file:{prog['path']}",
            description=f"pyannote-bundle {manifest['tool']['version']}: {prog['path']} "
                        f"({prog['size']} bytes)",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=prog["sha256"])]))
    bom.register_dependency(root, list(bom.components))  # the bundle ships all of them
    return JsonV1Dot6(bom).output_as_string(indent=2).encode() + b"\n"
