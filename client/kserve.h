/* kserve.h -- the KServe v2 calls tpclient's commands share: the model's layout from
 * ModelMetadata, and one ModelInfer of float32 rows, either in the message or through a system
 * shared-memory region that tpclient creates, registers, uses and removes (kserve_shm_*). The
 * commands hold float32; on the wire the rows have the model's datatype (FP32, FP16 or BF16),
 * converted here: float32 to FP16/BF16 rounds to nearest even, the way back is exact. */
#ifndef TPC_KSERVE_H
#define TPC_KSERVE_H

#include <stddef.h>
#include <stdint.h>

#include "conn.h"
#include "grpc_service.pb-c.h"
#include "tensor.h"

/* What tpclient takes from a server's ModelMetadata, far above any real layer and request, so
 * that a confused or hostile server cannot make it multiply its way past 64 bits or allocate
 * without end: in and out, max_batch, and the bytes of one request's rows of in or out values
 * (tpd itself stops at 1 GiB). */
#define KSERVE_MAX_FEATURES (1 << 26)
#define KSERVE_MAX_ROWS (1 << 24)
#define KSERVE_MAX_REQUEST_BYTES (1LL << 32)

struct kserve_layout {
    int64_t in;          /* input features */
    int64_t out;         /* output features */
    int64_t max_batch;   /* rows per request the server takes; 0 when it does not say */
    enum tp_dtype dtype; /* input and output datatype on the wire: TP_F32, TP_F16 or TP_BF16 */
};

/* Where a tensor lies in a registered system shared-memory region. */
struct kserve_shm_ref {
    const char *region; /* registered name */
    uint64_t bytes;     /* shared_memory_byte_size */
    uint64_t offset;    /* shared_memory_offset; 0 is not sent (it is the default) */
};

/* A ModelInferRequest for rows of the model's input, with the storage its pointers lead to: so
 * it must not be copied or moved once built. */
struct kserve_request {
    Inference__ModelInferRequest req;
    Inference__ModelInferRequest__InferInputTensor t, *ts[1];
    Inference__ModelInferRequest__InferRequestedOutputTensor o, *os[1];
    Inference__InferParameter pv[6];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry ie[3], *iep[3];
    Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry oe[3], *oep[3];
    int64_t shape[2];
    ProtobufCBinaryData raw;
};

/* Builds q: input "input" of [rows, l->in] in l->dtype, its bytes raw (rows*in elements, in the
 * message) or, raw NULL, in the region in; output "output" to the region out when given. model,
 * raw, in and out are borrowed for as long as q is used. */
void kserve_request_init(struct kserve_request *q, const char *model, const struct kserve_layout *l,
                         int64_t rows, const void *raw, const struct kserve_shm_ref *in,
                         const struct kserve_shm_ref *out);

/* The model to use: opt when given, else the server's one model (RepositoryIndex). */
int kserve_model(struct conn *c, const char *opt, char *buf, size_t len, struct tp_err *err);

/* Reads the layout of model; fails unless it is one [-1, in] -> [-1, out] tensor pair whose
 * input and output have the same datatype, FP32, FP16 or BF16, with a max_batch parameter that
 * is an integer if there is one, and within kserve_check_layout's bounds. */
int kserve_layout(struct conn *c, const char *model, struct kserve_layout *l, struct tp_err *err);

/* TP_EINVAL, naming the value, unless 1 <= in, out <= KSERVE_MAX_FEATURES, 0 <= max_batch <=
 * KSERVE_MAX_ROWS and max_batch rows of in or of out 4-byte values fit
 * KSERVE_MAX_REQUEST_BYTES: then every product of them fits 64 bits. */
int kserve_check_layout(const char *model, const struct kserve_layout *l, struct tp_err *err);

/* TP_EINVAL unless 1 <= rows and rows of in or of out 4-byte values fit KSERVE_MAX_REQUEST_BYTES;
 * kserve_infer and kserve_infer_shm check it before they compute a size. l must have passed
 * kserve_check_layout. */
int kserve_check_rows(const struct kserve_layout *l, int64_t rows, struct tp_err *err);

/* Whether a response whose output went to shared memory carries no data inline: no
 * raw_output_contents, or only empty ones (Triton sends one empty entry per output). */
int kserve_no_inline_output(const Inference__ModelInferResponse *r);

/* One ModelInfer of rows of x ([rows, in] float32, sent as l->dtype); writes [rows, out] floats
 * to y after checking the response's datatype, shape and size. */
int kserve_infer(struct conn *c, const char *model, const struct kserve_layout *l, const float *x,
                 int64_t rows, float *y, struct tp_err *err);

/* A POSIX shared-memory object of tpclient's, registered with the server as one region: inputs at
 * offset 0, outputs at out_off. */
struct kserve_shm {
    char name[64];  /* region name; the object's key is "/" + name */
    void *p;        /* mapping, NULL when closed */
    size_t size;    /* bytes */
    size_t out_off; /* bytes */
    int created, registered;
};

/* Creates the object for in_bytes + out_bytes, maps it and registers it. On failure everything
 * done is undone. */
int kserve_shm_open(struct conn *c, size_t in_bytes, size_t out_bytes, struct kserve_shm *s,
                    struct tp_err *err);

/* Like kserve_infer, through the region: copies x in, names the region for input and output,
 * checks that the response carries no data, copies y out. rows*in*4 and rows*out*4 bytes must
 * fit the sizes given to kserve_shm_open (enough for any dtype). */
int kserve_infer_shm(struct conn *c, const char *model, const struct kserve_layout *l,
                     struct kserve_shm *s, const float *x, int64_t rows, float *y,
                     struct tp_err *err);

/* Unregisters the region, unmaps and unlinks the object. Takes a closed or half-open one. */
void kserve_shm_close(struct conn *c, struct kserve_shm *s);

#endif
