/*
 * Stand-in for shim.c when e2fsprogs' headers (Debian: libext2fs-dev) are not installed at build
 * time: the same symbols, but opening a filesystem fails with VMI_EXT2_UNAVAILABLE, which the Rust
 * side turns into "install libext2fs-dev and rebuild". Everything else in vmi still builds and
 * works; only ext2/3/4 access is missing. The other functions are never reached (no filesystem
 * can be opened) and return neutral values.
 */
#include <stdint.h>
#include <stddef.h>

typedef long errcode_t;

/* Must equal `sys::VMI_EXT2_UNAVAILABLE` (src/ext4/sys.rs). */
#define VMI_EXT2_UNAVAILABLE 0x766d6901L

errcode_t vmi_ext2_open(void *volume, int writable, void **fs)
{
	(void)volume;
	(void)writable;
	*fs = NULL;
	return VMI_EXT2_UNAVAILABLE;
}

unsigned int vmi_ext2_blocksize(void *fs) { (void)fs; return 0; }
unsigned long long vmi_ext2_blocks_count(void *fs) { (void)fs; return 0; }
unsigned long long vmi_ext2_free_blocks_count(void *fs) { (void)fs; return 0; }
unsigned int vmi_ext2_first_data_block(void *fs) { (void)fs; return 0; }
int vmi_ext2_needs_recovery(void *fs) { (void)fs; return 0; }
int vmi_ext2_has_extents(void *fs) { (void)fs; return 0; }
int vmi_ext2_has_inline_data(void *fs) { (void)fs; return 0; }

void vmi_ext2_label_uuid(void *fs, char label[17], unsigned char uuid[16])
{
	(void)fs;
	label[0] = 0;
	for (int i = 0; i < 16; i++)
		uuid[i] = 0;
}

errcode_t vmi_ext2_block_bitmap_range(void *fs, unsigned long long start, unsigned int num,
				      void *out)
{
	(void)fs;
	(void)start;
	(void)num;
	(void)out;
	return VMI_EXT2_UNAVAILABLE;
}

void vmi_ext2_mark_super_dirty(void *fs) { (void)fs; }
