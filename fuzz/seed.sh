#!/usr/bin/env bash
# Seed corpora for every fuzz target from images qemu-img makes, then minimise them.
#
#   fuzz/seed.sh [--no-cmin] [TARGET...]
#
# Images are small on purpose (64 KiB virtual, the smallest cluster sizes, a few allocated
# clusters) and their trailing zeros are cut when qemu-img still reads the same data from the cut
# file, so the committed corpus stays small. Each disk target gets the images of its own format;
# `probe` and any disk target this script does not know (a new driver's) get every image; `ovf`
# gets OVF descriptors, manifests and OVA archives; the registry targets keep their hand-written
# seeds. New seeds are added to fuzz/corpus/<target>/ and then `cargo fuzz cmin` keeps the
# smallest set with the same coverage.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

cmin=1
if [ "${1:-}" = --no-cmin ]; then
    cmin=0
    shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(fuzz_targets)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/img"

# Guest data: a few distinct 512-byte patterns in a 64 KiB disk, so images get several allocated
# clusters (at 512-byte clusters) and some unallocated ones.
python3 - "$work/src.raw" <<'EOF'
import sys
b = bytearray(64 * 1024)
for n, off in enumerate((0, 4096, 9216, 61440)):
    for i in range(512):
        b[off + i] = (i * 7 + n * 31 + 1) & 0xFF
open(sys.argv[1], "wb").write(b)
EOF
src="$work/src.raw"
qi() { qemu-img "$@" >/dev/null; }
secret=(--object secret,id=sec0,data=fuzz-seed)

# keep FORMAT FILE: add FILE to the seeds of FORMAT, cut to its last non-zero sector when that
# reads back the same.
keep() {
    local fmt=$1 file=$2 out
    mkdir -p "$work/img/$fmt"
    out="$work/img/$fmt/$(basename "$file")"
    python3 - "$file" "$out.cut" <<'EOF'
import sys
b = open(sys.argv[1], "rb").read()
n = (len(b.rstrip(b"\0")) + 511) // 512 * 512
open(sys.argv[2], "wb").write(b[:max(n, 512)])
EOF
    if [ "$fmt" != luks ] && qemu-img compare -q -f "$fmt" -F "$fmt" "$file" "$out.cut" 2>/dev/null; then
        mv "$out.cut" "$out"
    else
        rm -f "$out.cut"
        cp "$file" "$out"
    fi
}

d="$work/gen"
mkdir -p "$d"

# qcow2: v2 and v3, refcount widths, zlib and zstd compression, extended L2, backing file,
# external data file, snapshots, bitmaps.
qi convert -O qcow2 -o compat=0.10,cluster_size=512 "$src" "$d/v2.qcow2"
qi convert -O qcow2 -o compat=1.1,cluster_size=512,refcount_bits=1 "$src" "$d/v3-rc1.qcow2"
qi convert -O qcow2 -o cluster_size=512,refcount_bits=64,lazy_refcounts=on "$src" "$d/v3-rc64.qcow2"
qi convert -c -O qcow2 -o cluster_size=512 "$src" "$d/zlib.qcow2"
qi convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$src" "$d/zstd.qcow2"
qi create -f qcow2 -o cluster_size=16384,extended_l2=on "$d/extl2.qcow2" 64K
qemu-io -f qcow2 -c 'write -P 0x11 4096 1024' "$d/extl2.qcow2" >/dev/null
qi create -f qcow2 -o cluster_size=512 -b "$d/v2.qcow2" -F qcow2 "$d/overlay.qcow2"
qemu-io -f qcow2 -c 'write -P 0x5a 1024 1024' "$d/overlay.qcow2" >/dev/null
qi create -f qcow2 -o cluster_size=512,data_file="$d/data.raw",data_file_raw=on "$d/datafile.qcow2" 64K
qi convert -O qcow2 -o cluster_size=512 "$src" "$d/snap.qcow2"
qi snapshot -c first "$d/snap.qcow2"
qemu-io -f qcow2 -c 'write -P 0xa5 8192 2048' "$d/snap.qcow2" >/dev/null
qi snapshot -c second "$d/snap.qcow2"
qi convert -O qcow2 -o cluster_size=512 "$src" "$d/bitmap.qcow2"
qi bitmap --add -g 4096 "$d/bitmap.qcow2" dirty
for f in v2 v3-rc1 v3-rc64 zlib zstd extl2 overlay datafile snap bitmap; do
    keep qcow2 "$d/$f.qcow2"
done

# vmdk: every subformat qemu-img writes (descriptor files of the split ones), compat6, zeroed grains.
for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat streamOptimized; do
    qi convert -O vmdk -o subformat=$sub "$src" "$d/$sub.vmdk"
    keep vmdk "$d/$sub.vmdk"
done
qi convert -O vmdk -o compat6=on,zeroed_grain=on,adapter_type=lsilogic "$src" "$d/compat6.vmdk"
keep vmdk "$d/compat6.vmdk"
qi create -f vmdk -b "$d/monolithicSparse.vmdk" -F vmdk "$d/child.vmdk"
keep vmdk "$d/child.vmdk"

# vpc: dynamic (empty: a data block is 2 MiB) and fixed; vhdx: dynamic with the smallest block and
# log (empty: qemu-img puts the first data block at 8 MiB).
qi create -f vpc -o subformat=dynamic "$d/dynamic.vhd" 64K
qi convert -O vpc -o subformat=fixed,force_size=on "$src" "$d/fixed.vhd"
keep vpc "$d/dynamic.vhd"
keep vpc "$d/fixed.vhd"
qi create -f vhdx -o log_size=1M,block_size=1M "$d/empty.vhdx" 64K
keep vhdx "$d/empty.vhdx"

# vdi: dynamic and static.
qi convert -O vdi "$src" "$d/dynamic.vdi"
qi convert -O vdi -o static=on "$src" "$d/static.vdi"
keep vdi "$d/dynamic.vdi"
keep vdi "$d/static.vdi"

# qcow (v1), QED, Parallels, LUKS.
qi convert -O qcow "$src" "$d/v1.qcow"
keep qcow "$d/v1.qcow"
qi convert -O qed -o cluster_size=4096 "$src" "$d/data.qed"
qi create -f qed -o cluster_size=4096 -b "$d/data.qed" -F qed "$d/child.qed"
keep qed "$d/data.qed"
keep qed "$d/child.qed"
qi convert -O parallels -o cluster_size=4096 "$src" "$d/data.hdd"
keep parallels "$d/data.hdd"
qi create -f luks "${secret[@]}" -o key-secret=sec0,iter-time=10 "$d/disk.luks" 64K
keep luks "$d/disk.luks"

# Raw disks with an MBR and a GPT partition table.
if command -v sfdisk >/dev/null 2>&1; then
    for label in dos gpt; do
        truncate -s 64K "$d/$label.raw"
        printf 'label: %s\nstart=34, size=64, type=%s\n' "$label" \
            "$([ $label = gpt ] && echo 0FC63DAF-8483-4772-8E79-3D69D8E4779D || echo 83)" |
            sfdisk -q "$d/$label.raw" >/dev/null 2>&1 || true
        keep raw "$d/$label.raw"
    done
fi

# OVF side: descriptors from the shared corpus and the vmi-ovf tests, manifests, an OVA.
ovf_seeds() {
    local out=$1 ovf_corpus=/work/shared/data/ovf-corpus
    mkdir -p "$out"
    if [ -d "$ovf_corpus" ]; then
        find "$ovf_corpus" -type f \( -name '*.ovf' -o -name '*.mf' -o -name '*.vmx' \) -size -12k |
            while read -r f; do cp "$f" "$out/$(sha1sum <"$f" | cut -c1-16)"; done
    fi
    find "$REPO_DIR/crates/vmi-ovf" -type f \( -name '*.ovf' -o -name '*.mf' -o -name '*.vmx' \
        -o -name '*.xml' -o -name '*.vbox' \) -size -12k 2>/dev/null |
        while read -r f; do cp "$f" "$out/$(sha1sum <"$f" | cut -c1-16)"; done
    local p="$work/ova"
    mkdir -p "$p"
    cat >"$p/vm.ovf" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:href="disk.vmdk" ovf:id="file1"/></References>
  <DiskSection><Info>Disks</Info><Disk ovf:capacity="65536" ovf:diskId="disk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A VM</Info>
    <VirtualHardwareSection><Info>Hardware</Info>
      <Item><rasd:ElementName>1 CPU</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>Memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>64</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>Disk</rasd:ElementName><rasd:HostResource>ovf:/disk/disk1</rasd:HostResource><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
EOF
    qemu-img convert -O vmdk -o subformat=streamOptimized "$src" "$p/disk.vmdk"
    (cd "$p" && printf 'SHA256(vm.ovf) = %s\nSHA256(disk.vmdk) = %s\n' \
        "$(sha256sum <vm.ovf | cut -d' ' -f1)" "$(sha256sum <disk.vmdk | cut -d' ' -f1)" >vm.mf)
    cp "$p/vm.ovf" "$out/vm.ovf"
    cp "$p/vm.mf" "$out/vm.mf"
    tar -C "$p" --format=ustar -cf "$out/vm.ova" vm.ovf vm.mf disk.vmdk
}

# Seeds for one target into DIR.
seed_target() {
    local t=$1 dir=$2
    case "$t" in
    ovf) ovf_seeds "$dir" ;;
    registry_* | patch | filter) ;; # hand-written seeds, committed
    *)
        if [ -d "$work/img/$t" ]; then
            cp "$work/img/$t/"* "$dir/"
        else
            # Every image up to libFuzzer's default input size (the VHDX one is larger).
            find "$work/img" -type f -size -1024k | while read -r f; do
                cp "$f" "$dir/$(basename "$(dirname "$f")")-$(basename "$f")"
            done
        fi
        ;;
    esac
}

[ $cmin = 0 ] || ensure_cargo_fuzz
for t in "${targets[@]}"; do
    dir="$FUZZ_DIR/corpus/$t"
    mkdir -p "$dir"
    seed_target "$t" "$dir"
    if [ $cmin = 1 ]; then
        fuzz_build "$t"
        tmp="$work/cmin-$t"
        mv "$dir" "$tmp"
        mkdir -p "$dir"
        # shellcheck disable=SC2046
        "$(fuzz_bin "$t")" -merge=1 $(fuzz_opts "$t") "$dir" "$tmp" >"$work/cmin-$t.log" 2>&1 ||
            { cat "$work/cmin-$t.log"; exit 1; }
    fi
    printf '%-12s %4d files %8d bytes\n' "$t" "$(find "$dir" -type f | wc -l)" "$(cat "$dir"/* 2>/dev/null | wc -c)"
done
