#ifndef CLINUX_H
#define CLINUX_H
// Linux calls that Swift's Glibc module does not export: epoll and eventfd (headers), malloc_trim, and accept4
// and memmem, GNU extensions that need _GNU_SOURCE, which only the .c file defines so that this header stays
// compatible with the Glibc module's view of the system headers.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <stddef.h>

/// accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC): the new connection is already
/// non-blocking and close-on-exec.
int clinux_accept_nonblocking(int listener);

/// memmem: the first occurrence of `needle` in `haystack`, or NULL.
void *clinux_memmem(const void *haystack, size_t haystack_length, const void *needle, size_t needle_length);

/// malloc_trim(0): returns the free memory of every malloc arena to the system.
void clinux_release_free_memory(void);
#endif
