#ifndef CLINUX_H
#define CLINUX_H
// Linux calls that Swift's Glibc module does not export: epoll and eventfd (headers), and accept4,
// a GNU extension that needs _GNU_SOURCE, which only the .c file defines so that this header stays
// compatible with the Glibc module's view of the system headers.
#include <sys/epoll.h>
#include <sys/eventfd.h>

/// accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC): the new connection is already
/// non-blocking and close-on-exec.
int clinux_accept_nonblocking(int listener);
#endif
