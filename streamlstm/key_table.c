/* The state store's key index in C (streamlstm/keyindex.py): key bytes -> slot, for a
 * whole batch in one call.
 *
 * A Python dict lookup of a batch of 4,096 among 100k keys waits on memory several times
 * per key (the key's str object, the dict's index, its entry, the slot's int object), one
 * wait after the other. Here the keys come as one buffer (UTF-8, separated by NUL bytes)
 * and the table is open addressing with the key's bytes inline in its bucket: one wait
 * per key, and for a whole batch at once (all buckets fetched ahead, then compared).
 *
 * A bucket is 32 bytes: the hash's low 32 bits, the slot (EMPTY, DELETED, or >= 0), the
 * key's length and up to KEY_MAX bytes of it. Longer keys are not held here (the lookup
 * answers LONG for them: the Python dict answers instead). Linear probing over a
 * power-of-two number of buckets, kept at most half full (live + deleted) by keyindex.py,
 * which also rebuilds the table when it grows.
 */
#include <stdint.h>
#include <string.h>

#define KEY_MAX 23
enum { EMPTY = -1, DELETED = -2 };    /* a bucket's slot when it holds no key */
enum { ABSENT = -1, LONG = -2 };      /* lookup answers besides a slot */

typedef struct {
    uint32_t hash;
    int32_t slot;
    uint8_t len;
    char key[KEY_MAX];
} bucket;

/* A 64-bit hash of a key's bytes: 8 bytes at a time through a multiply and a shift (the
 * keys are short: a stronger hash would cost more than the collisions it saves). */
static uint64_t hash_key(const char *key, int64_t len) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)len, word;
    int64_t at = 0;
    for (; at + 8 <= len; at += 8) {
        memcpy(&word, key + at, 8);
        h = (h ^ word) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    if (at < len) {
        word = 0;
        memcpy(&word, key + at, (size_t)(len - at));
        h = (h ^ word) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    h *= 0x94D049BB133111EBull;
    return h ^ (h >> 29);
}

/* Split blob (n keys separated by NUL bytes) into offsets and lengths; -1 if it does not
 * hold exactly n keys (a key with a NUL in it: the caller then asks the dict). */
static int split(const char *blob, int64_t size, int64_t n, int64_t *start, int64_t *len) {
    int64_t k = 0, from = 0;
    for (;;) {
        const char *end = memchr(blob + from, 0, (size_t)(size - from));
        int64_t to = end ? end - blob : size;
        if (k == n) return -1;
        start[k] = from;
        len[k++] = to - from;
        if (!end) break;
        from = to + 1;
    }
    return k == n ? 0 : -1;
}

/* The bucket holding key, or the first free one of its probe sequence (EMPTY slot). */
static bucket *probe(bucket *table, uint64_t mask, uint64_t h, const char *key, int64_t len) {
    for (uint64_t at = h & mask;; at = (at + 1) & mask) {
        bucket *b = table + at;
        if (b->slot == EMPTY) return b;
        if (b->slot >= 0 && b->hash == (uint32_t)h && b->len == len && !memcmp(b->key, key, (size_t)len))
            return b;
    }
}

/* slots[i] = the slot of key i of blob, ABSENT if not held, LONG if longer than KEY_MAX.
 * scratch: 3 n int64. Returns 0, or -1 if blob does not split into n keys. */
int64_t key_table_lookup(const bucket *table, int64_t buckets, const char *blob, int64_t size,
                         int64_t n, int64_t *slots, int64_t *scratch) {
    int64_t *start = scratch, *len = scratch + n;
    uint64_t *hash = (uint64_t *)(scratch + 2 * n), mask = (uint64_t)buckets - 1;
    if (split(blob, size, n, start, len)) return -1;
    /* First every key's bucket is asked for, then they are compared: the waits on memory
     * overlap (a batch's buckets, 4,096 lines, stay in the L2 cache in between). */
    for (int64_t i = 0; i < n; i++) {
        hash[i] = hash_key(blob + start[i], len[i]);
        __builtin_prefetch(table + (hash[i] & mask));
    }
    for (int64_t i = 0; i < n; i++) {
        if (len[i] > KEY_MAX) {
            slots[i] = LONG;
            continue;
        }
        const bucket *b = probe((bucket *)table, mask, hash[i], blob + start[i], len[i]);
        slots[i] = b->slot == EMPTY ? ABSENT : b->slot;
    }
    return 0;
}

/* Set the slot of each key of blob (inserted where absent; keys longer than KEY_MAX are
 * skipped). Returns the number of buckets newly taken, or -1 if blob does not split. */
int64_t key_table_insert(bucket *table, int64_t buckets, const char *blob, int64_t size,
                         int64_t n, const int64_t *slots, int64_t *scratch) {
    int64_t *start = scratch, *len = scratch + n, taken = 0;
    uint64_t mask = (uint64_t)buckets - 1;
    if (split(blob, size, n, start, len)) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (len[i] > KEY_MAX) continue;
        uint64_t h = hash_key(blob + start[i], len[i]);
        bucket *b = probe(table, mask, h, blob + start[i], len[i]);
        if (b->slot == EMPTY) {
            taken++;
            b->hash = (uint32_t)h;
            b->len = (uint8_t)len[i];
            memset(b->key, 0, KEY_MAX);
            memcpy(b->key, blob + start[i], (size_t)len[i]);
        }
        b->slot = (int32_t)slots[i];
    }
    return taken;
}

/* Mark the buckets of the keys of blob deleted (a key not held is ignored). Returns how
 * many were, or -1 if blob does not split. */
int64_t key_table_remove(bucket *table, int64_t buckets, const char *blob, int64_t size,
                         int64_t n, int64_t *scratch) {
    int64_t *start = scratch, *len = scratch + n, removed = 0;
    uint64_t mask = (uint64_t)buckets - 1;
    if (split(blob, size, n, start, len)) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (len[i] > KEY_MAX) continue;
        bucket *b = probe(table, mask, hash_key(blob + start[i], len[i]), blob + start[i], len[i]);
        if (b->slot >= 0) {
            b->slot = DELETED;
            removed++;
        }
    }
    return removed;
}
