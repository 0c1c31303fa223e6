#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include "CLinux.h"

int clinux_accept_nonblocking(int listener) {
    return accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

void *clinux_memmem(const void *haystack, size_t haystack_length, const void *needle, size_t needle_length) {
    return memmem(haystack, haystack_length, needle, needle_length);
}

void clinux_release_free_memory(void) { malloc_trim(0); }
