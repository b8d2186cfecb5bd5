/* test_infer.c -- ModelInfer validation: a valid request in each data form, then one bad field at
 * a time, each refused with the right code and a message that says what was expected and what
 * came; and the response echoes the id, names the output and carries exactly the rows given. The
 * same for models with FP16 and BF16 on the wire: sizes in 2-byte elements, raw bytes only, the
 * datatype named in responses, and a wrong datatype refused naming both. Inputs of 1 to 4 dims
 * flatten their leading dims into rows and are answered in their own shape with out last;
 * every bad shape is refused naming the shape and the dim at fault. The strings of a request on
 * the wire, however the message is sliced: UTF-8 of every length is taken, a NUL or a byte that
 * is not UTF-8 (overlong, surrogate, past U+10FFFF, cut short) is refused naming the field's path
 * and the byte's offset, in nested messages and map entries too; bytes fields are not strings. */
#include <grpc/byte_buffer_reader.h>

#include "gbuf.h"
#include "infer.h"
#include "layer.h"
#include "test.h"

static const struct model model = TEST_LAYER(TP_F32);

struct req {
    Inference__ModelInferRequest r;
    Inference__ModelInferRequest__InferInputTensor t;
    Inference__ModelInferRequest__InferInputTensor *ts[2];
    Inference__InferTensorContents contents;
    Inference__ModelInferRequest__InferRequestedOutputTensor o;
    Inference__ModelInferRequest__InferRequestedOutputTensor *os[1];
    int64_t shape[12];
    float x[16];
    ProtobufCBinaryData raw[2];
};

/* a valid request of 2 rows with raw contents */
static void make(struct req *q)
{
    *q = (struct req){0};
    inference__model_infer_request__init(&q->r);
    inference__model_infer_request__infer_input_tensor__init(&q->t);
    inference__infer_tensor_contents__init(&q->contents);
    inference__model_infer_request__infer_requested_output_tensor__init(&q->o);
    for (int i = 0; i < 16; i++)
        q->x[i] = (float)i;
    q->r.model_name = "lin";
    q->r.id = "req-7";
    q->t.name = "input";
    q->t.datatype = "FP32";
    q->shape[0] = 2, q->shape[1] = 3;
    q->t.n_shape = 2;
    q->t.shape = q->shape;
    q->ts[0] = q->ts[1] = &q->t;
    q->r.n_inputs = 1;
    q->r.inputs = q->ts;
    q->raw[0] = q->raw[1] = (ProtobufCBinaryData){.len = 24, .data = (uint8_t *)q->x};
    q->r.n_raw_input_contents = 1;
    q->r.raw_input_contents = q->raw;
    q->o.name = "output";
    q->os[0] = &q->o;
}

/* Moves the data from raw_input_contents to n typed fp32_contents. */
static void use_typed(struct req *q, size_t n)
{
    q->r.n_raw_input_contents = 0;
    q->contents.n_fp32_contents = n;
    q->contents.fp32_contents = q->x;
    q->t.contents = &q->contents;
}

static void expect_fail(struct req *q, enum tp_code code, const char *word)
{
    struct infer_input in;
    struct tp_err err = {0};

    ASSERT_EQ(infer_validate(&model, &q->r, NULL, &in, &err), -1);
    ASSERT_EQ(err.code, code);
    ASSERT_STR_HAS(err.msg, word);
    make(q);
}

static void test_valid_forms(void)
{
    struct req q;
    struct infer_input in;
    struct tp_err err = {0};

    make(&q);
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), 0);
    ASSERT_EQ(in.rows, 2);
    ASSERT_TRUE(in.x == q.x);
    q.r.model_version = "1";
    q.r.n_outputs = 1;
    q.r.outputs = q.os;
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), 0);
    /* typed contents instead of raw */
    make(&q);
    use_typed(&q, 6);
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), 0);
    ASSERT_EQ(in.rows, 2);
    ASSERT_TRUE(in.x == q.x);
    /* max_batch rows */
    make(&q);
    q.shape[0] = 4;
    q.raw[0].len = 48;
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), 0);
}

static void test_rejects(void)
{
    struct req q;

    make(&q);
    q.r.model_name = "other";
    expect_fail(&q, TP_ENOTFOUND, "'other'");
    q.r.model_version = "7";
    expect_fail(&q, TP_ENOTFOUND, "'7'");
    q.r.n_inputs = 0;
    expect_fail(&q, TP_EINVAL, "got 0");
    q.r.n_inputs = 2;
    expect_fail(&q, TP_EINVAL, "got 2");
    q.t.name = "x";
    expect_fail(&q, TP_EINVAL, "'x'");
    q.t.datatype = "FP64";
    expect_fail(&q, TP_EINVAL, "FP64");
    q.t.datatype = "INT32";
    expect_fail(&q, TP_EINVAL, "expected FP32");
    q.t.n_shape = 1;
    expect_fail(&q, TP_EINVAL, "has shape [2], expected [..., 3]: last dim 2 is not the model's 3");
    q.t.n_shape = 3;
    expect_fail(&q, TP_EINVAL, "[2, 3, 0]");
    q.shape[1] = 4;
    expect_fail(&q, TP_EINVAL, "[2, 4]");
    q.shape[0] = 0;
    q.raw[0].len = 0;
    expect_fail(&q, TP_EINVAL, "dim 0 is 0");
    q.shape[0] = 5;
    q.raw[0].len = 60;
    expect_fail(&q, TP_EINVAL, "5 rows");
    q.shape[0] = -1;
    expect_fail(&q, TP_EINVAL, "-1");
    q.raw[0].len = 20;
    expect_fail(&q, TP_EINVAL, "needs 24 bytes");
    q.r.n_raw_input_contents = 2;
    expect_fail(&q, TP_EINVAL, "raw_input_contents");
    q.r.n_raw_input_contents = 0;
    expect_fail(&q, TP_EINVAL, "no data");
    q.r.n_raw_input_contents = 0;
    q.t.contents = &q.contents;
    q.contents.n_fp32_contents = 5;
    q.contents.fp32_contents = q.x;
    expect_fail(&q, TP_EINVAL, "needs 6 fp32_contents, got 5");
    q.t.contents = &q.contents;
    expect_fail(&q, TP_EINVAL, "both");
    q.o.name = "logits";
    q.r.n_outputs = 1;
    q.r.outputs = q.os;
    expect_fail(&q, TP_EINVAL, "'logits'");
}

static void test_response(void)
{
    struct req q;
    float y[4] = {1.5f, -2, 3, 4.25f};
    grpc_byte_buffer *bb;
    Inference__ModelInferResponse *r;
    struct tp_err err = {0};

    make(&q);
    bb = infer_response(&model, q.r.id, y, 2, NULL, NULL);
    ASSERT_TRUE(bb != NULL);
    ASSERT_EQ(gbuf_unpack(bb, &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r,
                          &err),
              0);
    ASSERT_STR_EQ(r->id, "req-7");
    ASSERT_STR_EQ(r->model_name, "lin");
    ASSERT_EQ(r->n_outputs, 1);
    ASSERT_STR_EQ(r->outputs[0]->name, "output");
    ASSERT_STR_EQ(r->outputs[0]->datatype, "FP32");
    ASSERT_EQ(r->outputs[0]->n_shape, 2);
    ASSERT_EQ(r->outputs[0]->shape[0], 2);
    ASSERT_EQ(r->outputs[0]->shape[1], 2);
    ASSERT_EQ(r->n_raw_output_contents, 1);
    ASSERT_EQ(r->raw_output_contents[0].len, sizeof(y));
    ASSERT_EQ(memcmp(r->raw_output_contents[0].data, y, sizeof(y)), 0);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    grpc_byte_buffer_destroy(bb);
}

/* sets q's input shape to dims (n of them) and its raw data to the bytes they need in FP32 */
static void set_shape(struct req *q, const int64_t *dims, size_t n)
{
    size_t count = 1;

    for (size_t i = 0; i < n; i++) {
        q->shape[i] = dims[i];
        count *= dims[i] > 0 ? (size_t)dims[i] : 0;
    }
    q->t.n_shape = n;
    q->raw[0].len = count * sizeof(float);
}

static void expect_shape_ok(const int64_t *dims, size_t n, uint32_t rows)
{
    struct req q;
    struct infer_input in;
    struct tp_err err = {0};

    make(&q);
    set_shape(&q, dims, n);
    if (infer_validate(&model, &q.r, NULL, &in, &err) != 0)
        TEST_FAIL_("shape of %zu dims refused: %s", n, err.msg);
    ASSERT_EQ(in.rows, rows);
    ASSERT_EQ(in.nlead, n - 1);
    for (size_t i = 0; i + 1 < n; i++)
        ASSERT_EQ(in.lead[i], dims[i]);
    ASSERT_TRUE(in.x == q.x);
}

static void expect_shape_fail(const int64_t *dims, size_t n, const char *a, const char *b)
{
    struct req q;
    struct infer_input in;
    struct tp_err err = {0};

    make(&q);
    set_shape(&q, dims, n);
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, a);
    ASSERT_STR_HAS(err.msg, b);
    ASSERT_TRUE(strchr(err.msg, '\n') == NULL);
}

/* The output shape of a response, checked against want (n dims). */
static void expect_response_shape(const int64_t *lead, uint32_t nlead, const int64_t *want,
                                  size_t n)
{
    float y[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    grpc_byte_buffer *bb = infer_response_dims(&model, "s", y, lead, nlead, NULL, NULL);
    Inference__ModelInferResponse *r;
    struct tp_err err = {0};
    size_t rows = 1;

    ASSERT_TRUE(bb != NULL);
    ASSERT_EQ(gbuf_unpack(bb, &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r,
                          &err),
              0);
    ASSERT_EQ(r->outputs[0]->n_shape, n);
    for (size_t i = 0; i < n; i++)
        ASSERT_EQ(r->outputs[0]->shape[i], want[i]);
    for (uint32_t i = 0; i < nlead; i++)
        rows *= (size_t)lead[i];
    ASSERT_EQ(r->n_raw_output_contents, 1);
    ASSERT_EQ(r->raw_output_contents[0].len, rows * 2 * sizeof(float));
    ASSERT_EQ(memcmp(r->raw_output_contents[0].data, y, rows * 2 * sizeof(float)), 0);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    grpc_byte_buffer_destroy(bb);
}

/* [in], [B, S, in] and [A, B, S, in]: leading dims flattened into rows, sizes counted in rows,
 * the output in the input's shape with out last; and every way a shape can be wrong. */
static void test_shapes(void)
{
    struct req q;
    struct shape_case {
        int64_t dims[4];
        size_t n;
        uint32_t rows;
    } ok[] = {{{3}, 1, 1},       {{4, 3}, 2, 4},       {{1, 2, 3}, 3, 2},    {{2, 2, 3}, 3, 4},
              {{4, 1, 3}, 3, 4}, {{1, 1, 1, 3}, 4, 1}, {{2, 1, 2, 3}, 4, 4}, {{1, 4, 1, 3}, 4, 4}};
    struct infer_input in;
    struct tp_err err = {0};

    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        expect_shape_ok(ok[i].dims, ok[i].n, ok[i].rows);
    /* typed contents count rows of the flattened shape */
    make(&q);
    set_shape(&q, (int64_t[]){1, 2, 3}, 3);
    use_typed(&q, 6);
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), 0);
    ASSERT_EQ(in.rows, 2);
    q.contents.n_fp32_contents = 5;
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), -1);
    ASSERT_STR_HAS(err.msg, "input 'input' [1, 2, 3] needs 6 fp32_contents, got 5");
    /* raw bytes likewise, the message naming the shape */
    make(&q);
    set_shape(&q, (int64_t[]){2, 1, 2, 3}, 4);
    q.raw[0].len = 44;
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), -1);
    ASSERT_STR_HAS(err.msg, "input 'input' [2, 1, 2, 3] FP32 needs 48 bytes, raw_input_contents "
                            "has 44");
    make(&q);
    set_shape(&q, (int64_t[]){3}, 1);
    q.raw[0].len = 24;
    ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), -1);
    ASSERT_STR_HAS(err.msg, "[3] FP32 needs 12 bytes, raw_input_contents has 24");

    /* rank */
    expect_shape_fail((int64_t[]){1, 1, 1, 2, 3}, 5, "has shape [1, 1, 1, 2, 3], expected [..., 3]",
                      "it has 5 dims, at most 4 dims are accepted");
    expect_shape_fail((int64_t[]){1, 1, 1, 1, 1, 1, 1, 1, 1, 3}, 10, "[1, 1, 1, 1, 1, 1, ...]",
                      "it has 10 dims");
    expect_shape_fail(NULL, 0, "has shape [], expected [..., 3]", "no dims");
    /* the last dim */
    expect_shape_fail((int64_t[]){1, 2, 4}, 3, "has shape [1, 2, 4], expected [..., 3]",
                      "last dim 4 is not the model's 3 inputs");
    expect_shape_fail((int64_t[]){5}, 1, "has shape [5], expected [..., 3]", "last dim 5");
    expect_shape_fail((int64_t[]){1, 2, 3, 3, 0}, 5, "[1, 2, 3, 3, 0]", "at most 4 dims");
    expect_shape_fail((int64_t[]){2, 0}, 2, "[2, 0]", "last dim 0 is not the model's 3");
    /* a leading dim of 0 or less */
    expect_shape_fail((int64_t[]){2, 0, 3}, 3, "has shape [2, 0, 3], expected [..., 3]",
                      "dim 1 is 0, every dim must be at least 1");
    expect_shape_fail((int64_t[]){0, 2, 1, 3}, 4, "[0, 2, 1, 3]", "dim 0 is 0");
    expect_shape_fail((int64_t[]){1, 1, -2, 3}, 4, "[1, 1, -2, 3]", "dim 2 is -2");
    /* more rows than --max-batch, in any dims */
    expect_shape_fail((int64_t[]){2, 3, 3}, 3,
                      "has shape [2, 3, 3], expected [..., 3] with 1 to 4 rows (--max-batch)",
                      "its leading dims make 6 rows");
    expect_shape_fail((int64_t[]){1, 5, 1, 3}, 4, "[1, 5, 1, 3]", "make 5 rows");
    expect_shape_fail((int64_t[]){1LL << 40, 1LL << 40, 1LL << 40, 3}, 4, "1 to 4 rows",
                      "make over 2^63 rows");
    expect_shape_fail((int64_t[]){1LL << 31, 1LL << 31, 3}, 3, "1 to 4 rows",
                      "make 4611686018427387904 rows");

    /* the response: the leading dims, then out */
    expect_response_shape(NULL, 0, (int64_t[]){2}, 1);
    expect_response_shape((int64_t[]){3}, 1, (int64_t[]){3, 2}, 2);
    expect_response_shape((int64_t[]){1, 2}, 2, (int64_t[]){1, 2, 2}, 3);
    expect_response_shape((int64_t[]){2, 1, 2}, 3, (int64_t[]){2, 1, 2, 2}, 4);
}

/* a request whose input (and optionally output) lies in a shared-memory region */
struct shm_req {
    struct req q;
    Inference__InferParameter pv[3];
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry e[3], *ep[3];
};

static void make_shm(struct shm_req *s, int64_t byte_size, int64_t offset)
{
    static const char *const keys[3] = {"shared_memory_region", "shared_memory_byte_size",
                                        "shared_memory_offset"};

    make(&s->q);
    s->q.r.n_raw_input_contents = 0;
    for (int i = 0; i < 3; i++) {
        inference__infer_parameter__init(&s->pv[i]);
        inference__model_infer_request__infer_input_tensor__parameters_entry__init(&s->e[i]);
        s->e[i].key = (char *)keys[i];
        s->e[i].value = &s->pv[i];
        s->ep[i] = &s->e[i];
    }
    s->pv[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    s->pv[0].string_param = "reg";
    s->pv[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    s->pv[1].int64_param = byte_size;
    s->pv[2].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    s->pv[2].int64_param = offset;
    s->q.t.n_parameters = 3;
    s->q.t.parameters = s->ep;
}

static void expect_shm_fail(struct shm_req *s, const char *word)
{
    struct infer_input in;
    struct tp_err err = {0};

    ASSERT_EQ(infer_validate(&model, &s->q.r, NULL, &in, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    ASSERT_STR_HAS(err.msg, word);
}

static void test_shm_params(void)
{
    struct shm_req s;
    struct infer_input in;
    struct tp_err err = {0};
    Inference__ModelInferRequest__InferRequestedOutputTensor__ParametersEntry oe[2], *oep[2];
    Inference__InferParameter ov[2];

    make_shm(&s, 24, 4096);
    ASSERT_EQ(infer_validate(&model, &s.q.r, NULL, &in, &err), 0);
    ASSERT_STR_EQ(in.in_region, "reg");
    ASSERT_EQ(in.in_offset, 4096);
    ASSERT_TRUE(in.x == NULL);
    ASSERT_TRUE(in.out_region == NULL);
    make_shm(&s, 20, 0); /* 2 rows x 3 floats are 24 bytes */
    expect_shm_fail(&s, "24 bytes, shared_memory_byte_size is 20");
    make_shm(&s, 24, -8);
    expect_shm_fail(&s, "shared_memory_offset must be an integer >= 0");
    make_shm(&s, 24, 0);
    s.pv[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_INT64_PARAM;
    expect_shm_fail(&s, "must be a string");
    make_shm(&s, 24, 0);
    s.q.t.n_parameters = 1; /* no byte size */
    expect_shm_fail(&s, "needs shared_memory_byte_size");
    make_shm(&s, 24, 0);
    s.q.r.n_raw_input_contents = 1; /* data in the request too */
    expect_shm_fail(&s, "also has data");
    make_shm(&s, 24, 8);
    s.ep[0] = s.ep[2]; /* an offset without a region */
    s.q.t.n_parameters = 1;
    expect_shm_fail(&s, "no shared_memory_region");
    /* output to a region: byte size is rows * out * 4 = 16 */
    make_shm(&s, 24, 0);
    for (int i = 0; i < 2; i++) {
        inference__infer_parameter__init(&ov[i]);
        inference__model_infer_request__infer_requested_output_tensor__parameters_entry__init(
            &oe[i]);
        oe[i].value = &ov[i];
        oep[i] = &oe[i];
    }
    oe[0].key = "shared_memory_region";
    ov[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    ov[0].string_param = "outreg";
    oe[1].key = "shared_memory_byte_size";
    ov[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_UINT64_PARAM;
    ov[1].uint64_param = 16;
    s.q.o.n_parameters = 2;
    s.q.o.parameters = oep;
    s.q.r.n_outputs = 1;
    s.q.r.outputs = s.q.os;
    ASSERT_EQ(infer_validate(&model, &s.q.r, NULL, &in, &err), 0);
    ASSERT_STR_EQ(in.out_region, "outreg");
    ASSERT_EQ(in.out_offset, 0);
    ov[1].uint64_param = 24;
    expect_shm_fail(&s, "'output' FP32 needs 16 bytes");
    /* a 3-D input [1, 2, 3] is 2 rows: 24 bytes in, 16 out */
    make_shm(&s, 24, 0);
    s.q.shape[0] = 1, s.q.shape[1] = 2, s.q.shape[2] = 3;
    s.q.t.n_shape = 3;
    s.q.o.n_parameters = 2;
    s.q.o.parameters = oep;
    s.q.r.n_outputs = 1;
    s.q.r.outputs = s.q.os;
    ov[1].uint64_param = 16;
    ASSERT_EQ(infer_validate(&model, &s.q.r, NULL, &in, &err), 0);
    ASSERT_EQ(in.rows, 2);
    ASSERT_EQ(in.nlead, 2);
    ASSERT_STR_EQ(in.in_region, "reg");
    ASSERT_STR_EQ(in.out_region, "outreg");
    ov[1].uint64_param = 24;
    expect_shm_fail(&s, "'output' FP32 needs 16 bytes, shared_memory_byte_size is 24");
    ov[1].uint64_param = 16;
    s.pv[1].int64_param = 48;
    expect_shm_fail(&s, "'input' FP32 needs 24 bytes, shared_memory_byte_size is 48");
}

static int released;

static void release(void *user)
{
    ASSERT_TRUE(user == &released);
    released++;
}

/* the data slice points at y and is released exactly once, when the buffer is gone */
static void test_response_in_place(void)
{
    float y[6] = {1, 2, 3, 4, 5, 6};
    grpc_byte_buffer *bb = infer_response(&model, "id-9", y, 3, release, &released);
    Inference__ModelInferResponse *r;
    grpc_byte_buffer_reader rd;
    grpc_slice *s;
    int nslices = 0, points_at_y = 0;
    struct tp_err err = {0};

    ASSERT_TRUE(bb != NULL);
    ASSERT_TRUE(grpc_byte_buffer_reader_init(&rd, bb));
    while (grpc_byte_buffer_reader_peek(&rd, &s)) {
        nslices++;
        points_at_y += GRPC_SLICE_START_PTR(*s) == (uint8_t *)y;
    }
    grpc_byte_buffer_reader_destroy(&rd);
    ASSERT_EQ(nslices, 2);
    ASSERT_EQ(points_at_y, 1);
    ASSERT_EQ(gbuf_unpack(bb, &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r,
                          &err),
              0);
    ASSERT_STR_EQ(r->id, "id-9");
    ASSERT_EQ(r->outputs[0]->shape[0], 3);
    ASSERT_EQ(r->n_raw_output_contents, 1);
    ASSERT_EQ(r->raw_output_contents[0].len, sizeof(y));
    ASSERT_EQ(memcmp(r->raw_output_contents[0].data, y, sizeof(y)), 0);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    ASSERT_EQ(released, 0);
    grpc_byte_buffer_destroy(bb);
    ASSERT_EQ(released, 1);
    /* output in shared memory: one empty raw_output_contents per output, as Triton sends (its
     * C++ client reads raw_output_contents[i] for output i, and crashed without it) */
    bb = infer_response(&model, "id-9", NULL, 3, release, &released);
    ASSERT_EQ(gbuf_unpack(bb, &inference__model_infer_response__descriptor, (ProtobufCMessage **)&r,
                          &err),
              0);
    ASSERT_EQ(r->n_raw_output_contents, 1);
    ASSERT_EQ(r->raw_output_contents[0].len, 0);
    ASSERT_EQ(r->outputs[0]->shape[1], 2);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    grpc_byte_buffer_destroy(bb);
    ASSERT_EQ(released, 1);
}

/* FP16 and BF16 models: the same layer with 2-byte elements on the wire. */
static void test_half_dtypes(void)
{
    static const enum tp_dtype types[2] = {TP_F16, TP_BF16};
    static const char *const names[2] = {"FP16", "BF16"};

    for (int k = 0; k < 2; k++) {
        struct model m = model;
        struct req q;
        struct shm_req s;
        struct infer_input in;
        struct tp_err err = {0};
        uint16_t y[6] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x8000, 0x3555};
        grpc_byte_buffer *bb;
        Inference__ModelInferResponse *r;

        m.io_dtype = types[k];
        /* 2 rows x 3 elements x 2 bytes */
        make(&q);
        q.t.datatype = (char *)names[k];
        q.raw[0].len = 12;
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), 0);
        ASSERT_EQ(in.rows, 2);
        ASSERT_TRUE(in.x == q.x);
        /* FP32-sized data */
        q.raw[0].len = 24;
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), -1);
        ASSERT_EQ(err.code, TP_EINVAL);
        ASSERT_STR_HAS(err.msg, names[k]);
        ASSERT_STR_HAS(err.msg, "needs 12 bytes, raw_input_contents has 24");
        /* the wrong datatype: both named */
        make(&q);
        q.raw[0].len = 12;
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), -1);
        ASSERT_EQ(err.code, TP_EINVAL);
        ASSERT_STR_HAS(err.msg, "'FP32'");
        ASSERT_STR_HAS(err.msg, names[k]);
        q.t.datatype = (char *)names[1 - k];
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), -1);
        ASSERT_STR_HAS(err.msg, names[1 - k]);
        ASSERT_STR_HAS(err.msg, names[k]);
        /* and an FP32 model refuses the half types */
        q.t.datatype = (char *)names[k];
        q.raw[0].len = 24;
        ASSERT_EQ(infer_validate(&model, &q.r, NULL, &in, &err), -1);
        ASSERT_STR_HAS(err.msg, names[k]);
        ASSERT_STR_HAS(err.msg, "expected FP32");
        /* typed contents carry FP32 only */
        make(&q);
        q.t.datatype = (char *)names[k];
        q.r.n_raw_input_contents = 0;
        q.contents.n_fp32_contents = 6;
        q.contents.fp32_contents = q.x;
        q.t.contents = &q.contents;
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), -1);
        ASSERT_STR_HAS(err.msg, "raw_input_contents");
        q.t.contents = NULL;
        ASSERT_EQ(infer_validate(&m, &q.r, NULL, &in, &err), -1);
        ASSERT_STR_HAS(err.msg, "no data");
        /* shared memory: byte sizes in 2-byte elements */
        make_shm(&s, 12, 0);
        s.q.t.datatype = (char *)names[k];
        ASSERT_EQ(infer_validate(&m, &s.q.r, NULL, &in, &err), 0);
        s.pv[1].int64_param = 24;
        ASSERT_EQ(infer_validate(&m, &s.q.r, NULL, &in, &err), -1);
        ASSERT_STR_HAS(err.msg, "needs 12 bytes, shared_memory_byte_size is 24");
        /* the response: the datatype, and 2-byte elements as given */
        bb = infer_response(&m, "h", y, 3, NULL, NULL);
        ASSERT_TRUE(bb != NULL);
        ASSERT_EQ(gbuf_unpack(bb, &inference__model_infer_response__descriptor,
                              (ProtobufCMessage **)&r, &err),
                  0);
        ASSERT_STR_EQ(r->outputs[0]->datatype, names[k]);
        ASSERT_EQ(r->outputs[0]->shape[0], 3);
        ASSERT_EQ(r->outputs[0]->shape[1], 2);
        ASSERT_EQ(r->n_raw_output_contents, 1);
        ASSERT_EQ(r->raw_output_contents[0].len, sizeof(y));
        ASSERT_EQ(memcmp(r->raw_output_contents[0].data, y, sizeof(y)), 0);
        protobuf_c_message_free_unpacked(&r->base, NULL);
        grpc_byte_buffer_destroy(bb);
    }
}

/* ---- strings on the wire ---- */

/* packs m, replaces the one occurrence of from by to (as many bytes: the length prefixes stay
 * right) and checks its strings as one slice, then split in two slices at every byte, as TCP
 * reads may cut it: every split must give the same answer. Returns the result, err of the last
 * check. */
static int strings_of(const ProtobufCMessage *m, const char *from, const char *to, size_t n,
                      struct tp_err *err)
{
    uint8_t buf[1024], *hit = NULL;
    size_t len = protobuf_c_message_get_packed_size(m);
    int first = -2;

    ASSERT_LE(len, sizeof(buf));
    protobuf_c_message_pack(m, buf);
    if (from) {
        for (size_t i = 0; i + n <= len; i++)
            if (memcmp(buf + i, from, n) == 0) {
                ASSERT_TRUE(hit == NULL);
                hit = buf + i;
            }
        ASSERT_TRUE(hit != NULL);
        memcpy(hit, to, n);
    }
    for (size_t cut = 0; cut <= len; cut++) {
        grpc_slice s[2] = {grpc_slice_from_copied_buffer((const char *)buf, cut),
                           grpc_slice_from_copied_buffer((const char *)buf + cut, len - cut)};
        grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, 2);
        int rc;

        *err = (struct tp_err){0};
        rc = infer_check_strings(bb, m->descriptor, err);
        if (first == -2)
            first = rc;
        ASSERT_EQ(rc, first);
        grpc_byte_buffer_destroy(bb);
        grpc_slice_unref(s[0]);
        grpc_slice_unref(s[1]);
    }
    return first;
}

/* q with `from` (in some string of it) replaced by `to` is refused naming field and why */
static void expect_bad_string(struct req *q, const char *from, const char *to, size_t n,
                              const char *field, const char *why)
{
    struct tp_err err = {0};
    char quoted[128];

    ASSERT_EQ(strings_of(&q->r.base, from, to, n, &err), -1);
    ASSERT_EQ(err.code, TP_EINVAL);
    snprintf(quoted, sizeof(quoted), "field '%s' ", field);
    ASSERT_STR_HAS(err.msg, quoted);
    ASSERT_STR_HAS(err.msg, why);
    ASSERT_STR_HAS(err.msg, "strings must be UTF-8 without NUL");
    make(q);
}

static void test_strings(void)
{
    struct req q;
    struct tp_err err = {0};
    Inference__InferParameter pv[2];
    Inference__ModelInferRequest__ParametersEntry re, *rep[1] = {&re};
    Inference__ModelInferRequest__InferInputTensor__ParametersEntry ie, *iep[1] = {&ie};
    Inference__ModelInferRequest__InferInputTensor t2;
    Inference__ModelReadyRequest ready = INFERENCE__MODEL_READY_REQUEST__INIT;
    uint8_t junk[8] = {0xff, 0, 0xc0, 0x80, 0xed, 0xa0, 0x80, 0xfe};

    /* valid: ASCII, and UTF-8 of 2, 3 and 4 bytes up to U+10FFFF; bytes fields hold anything */
    make(&q);
    q.r.id = "r\xc3\xa9q-\xe2\x9c\x93-\xf0\x9f\x98\x80-\xf4\x8f\xbf\xbf";
    q.raw[0] = (ProtobufCBinaryData){.len = sizeof(junk), .data = junk};
    ASSERT_EQ(strings_of(&q.r.base, NULL, NULL, 0, &err), 0);

    /* a NUL, which protobuf-c's C string would cut at: "FP32\0junk" reads as "FP32" */
    make(&q);
    q.t.datatype = "FP32Xjunk";
    expect_bad_string(&q, "FP32X", "FP32\0", 5, "inputs[0].datatype", "has a NUL byte at 4");
    q.r.model_name = "linX";
    expect_bad_string(&q, "linX", "lin\0", 4, "model_name", "NUL byte at 3");
    q.t.name = "inputX";
    expect_bad_string(&q, "inputX", "input\0", 6, "inputs[0].name", "NUL byte at 5");
    q.r.n_outputs = 1;
    q.r.outputs = q.os;
    q.o.name = "Xoutput";
    expect_bad_string(&q, "Xoutput", "\0output", 7, "outputs[0].name", "NUL byte at 0");

    /* not UTF-8 */
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "\xff\xfe\xfd\xfc", 4, "id", "not UTF-8: byte 0xff at 0");
    q.r.id = "abIDID";
    expect_bad_string(&q, "IDID", "\x80xyz", 4, "id", "byte 0x80 at 2");
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "\xc0\x80zz", 4, "id", "byte 0xc0 at 0"); /* overlong NUL */
    q.r.id = "IDIDID";
    expect_bad_string(&q, "IDIDID", "xx\xe0\x80\x80y", 6, "id", "at 2"); /* overlong */
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "\xed\xa0\x80z", 4, "id", "byte 0xed at 0"); /* surrogate */
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "\xf4\x90\x80\x80", 4, "id", "at 0"); /* past U+10FFFF */
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "\xf8\x88\x80\x80", 4, "id", "byte 0xf8 at 0");
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "ab\xe2\x82", 4, "id", "byte 0xe2 at 2"); /* cut short */
    q.r.id = "IDID";
    expect_bad_string(&q, "IDID", "a\xc3z", 3, "id", "byte 0xc3 at 1");

    /* nested: the second input, parameters of the request and of an input, keys and values */
    inference__model_infer_request__infer_input_tensor__init(&t2);
    t2.name = "secondX";
    t2.datatype = "FP32";
    q.ts[1] = &t2;
    q.r.n_inputs = 2;
    expect_bad_string(&q, "secondX", "second\xff", 7, "inputs[1].name", "byte 0xff at 6");
    for (int i = 0; i < 2; i++)
        inference__infer_parameter__init(&pv[i]);
    inference__model_infer_request__parameters_entry__init(&re);
    re.key = "KEYKEY";
    re.value = &pv[0];
    pv[0].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    pv[0].string_param = "VALVAL";
    q.r.n_parameters = 1;
    q.r.parameters = rep;
    expect_bad_string(&q, "KEYKEY", "key\xe2\x82z", 6, "parameters[0].key", "byte 0xe2 at 3");
    q.r.n_parameters = 1;
    q.r.parameters = rep;
    expect_bad_string(&q, "VALVAL", "val\0al", 6, "parameters[0].value.string_param",
                      "NUL byte at 3");
    inference__model_infer_request__infer_input_tensor__parameters_entry__init(&ie);
    ie.key = "shared_memory_region";
    ie.value = &pv[1];
    pv[1].parameter_choice_case = INFERENCE__INFER_PARAMETER__PARAMETER_CHOICE_STRING_PARAM;
    pv[1].string_param = "REGREG";
    q.t.n_parameters = 1;
    q.t.parameters = iep;
    expect_bad_string(&q, "REGREG", "reg\x80\x80\x80", 6,
                      "inputs[0].parameters[0].value.string_param", "byte 0x80 at 3");

    /* any message: the name of ModelReady */
    ready.name = "linX";
    ASSERT_EQ(strings_of(&ready.base, "linX", "lin\0", 4, &err), -1);
    ASSERT_STR_HAS(err.msg, "field 'name' has a NUL byte at 3");
    ready.name = "lin";
    ASSERT_EQ(strings_of(&ready.base, NULL, NULL, 0, &err), 0);

    /* malformed wire data is refused, never read past its end */
    {
        static const uint8_t cut[] = {0x1a, 0x05, 'a', 'b'}; /* id of 5 bytes, 2 there */
        grpc_slice s = grpc_slice_from_copied_buffer((const char *)cut, sizeof(cut));
        grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);

        ASSERT_EQ(infer_check_strings(bb, &inference__model_infer_request__descriptor, &err), -1);
        ASSERT_EQ(err.code, TP_EINVAL);
        ASSERT_STR_HAS(err.msg, "malformed");
        grpc_byte_buffer_destroy(bb);
        grpc_slice_unref(s);
    }
}

int main(void)
{
    TEST_RUN(test_valid_forms);
    TEST_RUN(test_rejects);
    TEST_RUN(test_response);
    TEST_RUN(test_shapes);
    TEST_RUN(test_response_in_place);
    TEST_RUN(test_shm_params);
    TEST_RUN(test_half_dtypes);
    TEST_RUN(test_strings);
    return 0;
}
