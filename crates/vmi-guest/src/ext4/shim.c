/*
 * The C side of vmi-guest's libext2fs binding: an io_manager whose channel reads and writes a
 * vmi Volume through three Rust callbacks, and accessors for the few ext2_filsys fields the Rust
 * side needs. Kept in C so that the layouts of struct_io_manager, struct_io_channel and
 * struct_ext2_filsys come from e2fsprogs' own headers rather than from a hand transcription.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ext2fs/ext2fs.h>

/* Implemented in Rust (src/ext4/mod.rs); each returns 0 or an errno value and never unwinds. */
extern int vmi_guest_volume_read(void *volume, uint64_t offset, size_t len, void *buf);
extern int vmi_guest_volume_write(void *volume, uint64_t offset, size_t len, const void *buf);
extern int vmi_guest_volume_flush(void *volume);

/* The channel's name is "vmi-volume:<pointer>"; the pointer is the Rust Volume. */
static const char NAME_PREFIX[] = "vmi-volume:";

struct vmi_private {
	void *volume;
};

static errcode_t vmi_open(const char *name, int flags, io_channel *channel);
static errcode_t vmi_close(io_channel channel);
static errcode_t vmi_set_blksize(io_channel channel, int blksize);
static errcode_t vmi_read_blk64(io_channel channel, unsigned long long block, int count,
				void *data);
static errcode_t vmi_write_blk64(io_channel channel, unsigned long long block, int count,
				 const void *data);
static errcode_t vmi_read_blk(io_channel channel, unsigned long block, int count, void *data);
static errcode_t vmi_write_blk(io_channel channel, unsigned long block, int count,
			       const void *data);
static errcode_t vmi_flush(io_channel channel);
static errcode_t vmi_write_byte(io_channel channel, unsigned long offset, int count,
				const void *data);
static errcode_t vmi_set_option(io_channel channel, const char *option, const char *arg);

static struct struct_io_manager vmi_io_manager = {
	.magic = EXT2_ET_MAGIC_IO_MANAGER,
	.name = "vmi volume I/O manager",
	.open = vmi_open,
	.close = vmi_close,
	.set_blksize = vmi_set_blksize,
	.read_blk = vmi_read_blk,
	.write_blk = vmi_write_blk,
	.flush = vmi_flush,
	.write_byte = vmi_write_byte,
	.set_option = vmi_set_option,
	.read_blk64 = vmi_read_blk64,
	.write_blk64 = vmi_write_blk64,
};

static errcode_t vmi_open(const char *name, int flags, io_channel *channel)
{
	io_channel io = NULL;
	struct vmi_private *priv = NULL;
	void *volume = NULL;
	errcode_t err;

	(void)flags;
	if (name == NULL || strncmp(name, NAME_PREFIX, sizeof(NAME_PREFIX) - 1) != 0 ||
	    sscanf(name + sizeof(NAME_PREFIX) - 1, "%p", &volume) != 1 || volume == NULL)
		return EXT2_ET_BAD_DEVICE_NAME;
	err = ext2fs_get_memzero(sizeof(struct struct_io_channel), &io);
	if (err)
		return err;
	err = ext2fs_get_memzero(sizeof(struct vmi_private), &priv);
	if (err)
		goto fail;
	err = ext2fs_get_mem(strlen(name) + 1, &io->name);
	if (err)
		goto fail;
	strcpy(io->name, name);
	priv->volume = volume;
	io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
	io->manager = &vmi_io_manager;
	io->block_size = 1024;
	io->private_data = priv;
	io->refcount = 1;
	*channel = io;
	return 0;
fail:
	if (priv)
		ext2fs_free_mem(&priv);
	if (io)
		ext2fs_free_mem(&io);
	return err;
}

static errcode_t vmi_close(io_channel channel)
{
	if (--channel->refcount > 0)
		return 0;
	ext2fs_free_mem(&channel->private_data);
	ext2fs_free_mem(&channel->name);
	ext2fs_free_mem(&channel);
	return 0;
}

static errcode_t vmi_set_blksize(io_channel channel, int blksize)
{
	if (blksize <= 0)
		return EXT2_ET_INVALID_ARGUMENT;
	channel->block_size = blksize;
	return 0;
}

/* count > 0: blocks; count < 0: bytes (the io_manager convention). */
static errcode_t span(io_channel channel, unsigned long long block, int count, uint64_t *offset,
		      size_t *len)
{
	uint64_t bs = (uint64_t)channel->block_size;
	if (block > UINT64_MAX / bs)
		return EXT2_ET_LLSEEK_FAILED;
	*offset = block * bs;
	*len = count < 0 ? (size_t)(-(int64_t)count) : (size_t)count * bs;
	return 0;
}

static errcode_t vmi_read_blk64(io_channel channel, unsigned long long block, int count,
				void *data)
{
	struct vmi_private *priv = channel->private_data;
	uint64_t offset;
	size_t len;
	errcode_t err = span(channel, block, count, &offset, &len);
	int rc;

	if (err)
		return err;
	rc = vmi_guest_volume_read(priv->volume, offset, len, data);
	if (rc == 0)
		return 0;
	if (channel->read_error)
		return channel->read_error(channel, block, count, data, len, 0, EXT2_ET_SHORT_READ);
	return EXT2_ET_SHORT_READ;
}

static errcode_t vmi_write_blk64(io_channel channel, unsigned long long block, int count,
				 const void *data)
{
	struct vmi_private *priv = channel->private_data;
	uint64_t offset;
	size_t len;
	errcode_t err = span(channel, block, count, &offset, &len);
	int rc;

	if (err)
		return err;
	rc = vmi_guest_volume_write(priv->volume, offset, len, data);
	if (rc == 0)
		return 0;
	if (channel->write_error)
		return channel->write_error(channel, block, count, data, len, 0,
					    EXT2_ET_SHORT_WRITE);
	return EXT2_ET_SHORT_WRITE;
}

static errcode_t vmi_read_blk(io_channel channel, unsigned long block, int count, void *data)
{
	return vmi_read_blk64(channel, block, count, data);
}

static errcode_t vmi_write_blk(io_channel channel, unsigned long block, int count,
			       const void *data)
{
	return vmi_write_blk64(channel, block, count, data);
}

static errcode_t vmi_write_byte(io_channel channel, unsigned long offset, int count,
				const void *data)
{
	struct vmi_private *priv = channel->private_data;
	if (count < 0)
		return EXT2_ET_INVALID_ARGUMENT;
	return vmi_guest_volume_write(priv->volume, offset, (size_t)count, data) ?
		       EXT2_ET_SHORT_WRITE : 0;
}

static errcode_t vmi_flush(io_channel channel)
{
	struct vmi_private *priv = channel->private_data;
	return vmi_guest_volume_flush(priv->volume) ? EXT2_ET_SHORT_WRITE : 0;
}

static errcode_t vmi_set_option(io_channel channel, const char *option, const char *arg)
{
	(void)channel;
	(void)option;
	(void)arg;
	return EXT2_ET_INVALID_ARGUMENT;
}

/* Open the filesystem on `volume` (a pointer the Rust side keeps alive until close). */
errcode_t vmi_ext2_open(void *volume, int writable, ext2_filsys *fs)
{
	char name[64];
	int flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP | (writable ? EXT2_FLAG_RW : 0);
	snprintf(name, sizeof(name), "%s%p", NAME_PREFIX, volume);
	return ext2fs_open2(name, NULL, flags, 0, 0, &vmi_io_manager, fs);
}

unsigned int vmi_ext2_blocksize(ext2_filsys fs)
{
	return fs->blocksize;
}

unsigned long long vmi_ext2_blocks_count(ext2_filsys fs)
{
	return ext2fs_blocks_count(fs->super);
}

unsigned long long vmi_ext2_free_blocks_count(ext2_filsys fs)
{
	return ext2fs_free_blocks_count(fs->super);
}

unsigned int vmi_ext2_first_data_block(ext2_filsys fs)
{
	return fs->super->s_first_data_block;
}

int vmi_ext2_needs_recovery(ext2_filsys fs)
{
	return ext2fs_has_feature_journal_needs_recovery(fs->super);
}

int vmi_ext2_has_extents(ext2_filsys fs)
{
	return ext2fs_has_feature_extents(fs->super);
}

int vmi_ext2_has_inline_data(ext2_filsys fs)
{
	return ext2fs_has_feature_inline_data(fs->super);
}

/* Copy the volume label (NUL-terminated) and UUID. */
void vmi_ext2_label_uuid(ext2_filsys fs, char label[17], unsigned char uuid[16])
{
	memcpy(label, fs->super->s_volume_name, 16);
	label[16] = 0;
	memcpy(uuid, fs->super->s_uuid, 16);
}

/* `num` bits of the block bitmap from block `start` into `out` (bit i of byte i/8). */
errcode_t vmi_ext2_block_bitmap_range(ext2_filsys fs, unsigned long long start, unsigned int num,
				      void *out)
{
	errcode_t err = ext2fs_read_block_bitmap(fs);
	if (err)
		return err;
	return ext2fs_get_block_bitmap_range2(fs->block_map, start, num, out);
}

void vmi_ext2_mark_super_dirty(ext2_filsys fs)
{
	ext2fs_mark_super_dirty(fs);
}
