/* A checking allocator for Python stubs: abort, with a C stack, on any Python allocation
 * or free made without the GIL.
 *
 * Why: Triton 2.51's python backend has C++ threads that create and free Python objects
 * without the GIL (backend/serving/reasoning_wire.py). Such a race corrupts pymalloc
 * silently and the stub dies much later, somewhere unrelated. With this hook installed
 * (MULTISTREAM_GIL_CHECK=<path of the built .so>, read by
 * backend.serving.instance.enable_crash_traces) the first offending call aborts the stub
 * and its stack goes to the server log. The test suite builds and installs it
 * (tests/conftest.py), so a regression fails CI at the culprit, not minutes later.
 *
 * Build: gcc -O1 -shared -fPIC -I<python include dir> gil_check.c -o gil_check.so
 */
#include <Python.h>
#include <execinfo.h>
#include <stdlib.h>
#include <unistd.h>

static PyMemAllocatorEx orig_obj, orig_mem;

static void check(void)
{
  if (!PyGILState_Check()) {
    static const char msg[] = "\nFatal: Python memory allocator called off the GIL (gil_check)\n";
    void* frames[64];
    int n = backtrace(frames, 64);
    (void)!write(2, msg, sizeof(msg) - 1);
    backtrace_symbols_fd(frames, n, 2);
    abort();
  }
}

static void* h_malloc(void* ctx, size_t n)
{
  check();
  PyMemAllocatorEx* a = ctx;
  return a->malloc(a->ctx, n);
}

static void* h_calloc(void* ctx, size_t e, size_t n)
{
  check();
  PyMemAllocatorEx* a = ctx;
  return a->calloc(a->ctx, e, n);
}

static void* h_realloc(void* ctx, void* p, size_t n)
{
  check();
  PyMemAllocatorEx* a = ctx;
  return a->realloc(a->ctx, p, n);
}

static void h_free(void* ctx, void* p)
{
  check();
  PyMemAllocatorEx* a = ctx;
  a->free(a->ctx, p);
}

/* Call with the GIL held (ctypes.PyDLL), once per process. */
int install(void)
{
  static int installed = 0;
  if (installed) return 0;
  PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &orig_obj);
  PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &orig_mem);
  PyMemAllocatorEx obj = {&orig_obj, h_malloc, h_calloc, h_realloc, h_free};
  PyMemAllocatorEx mem = {&orig_mem, h_malloc, h_calloc, h_realloc, h_free};
  PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &obj);
  PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &mem);
  installed = 1;
  return 1;
}
