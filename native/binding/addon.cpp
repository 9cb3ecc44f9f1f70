// Node binding for pearl::Engine. Each NativeEngine owns one engine thread with a FIFO job queue: every
// method parses its arguments on the main thread, queues a job and returns a Promise that a
// ThreadSafeFunction settles on the main thread, so the event loop never waits for the model. A step
// queued behind a step that is still on the device may begin before that one is settled (overlapped steps,
// EngineThread::Run), so a caller that queues its next decode step early keeps the device busy.
//
// Lifetimes: the wrapper keeps itself alive (ObjectWrap::Ref) while it has jobs in flight, and the TSFN is
// referenced only then, so an idle engine does not keep the process alive. The thread state is shared
// with the TSFN finalizer because, at environment teardown, Node may finalize the TSFN before or after the
// wrapper's destructor.
#include <napi.h>

#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#endif

#include "engine.h"
#ifdef PEARL_WITH_CUDA
#include "cuda_backend.h"
#endif

namespace {

constexpr double kMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1, Number.MAX_SAFE_INTEGER

class NativeEngine;

// Runs on the main thread once the engine thread has finished a job; builds the value the Promise
// resolves with.
using ResultBuilder = std::function<Napi::Value(Napi::Env)>;
// Runs on the engine thread. Receives the engine slot so that load and close can fill and empty it.
using Work = std::function<ResultBuilder(std::unique_ptr<pearl::Engine>&)>;

struct Job {
  Job(NativeEngine* owner, Napi::Env env, Work work) : owner(owner), deferred(env), work(std::move(work)) {}

  NativeEngine* owner;
  Napi::Promise::Deferred deferred;
  Work work;
  // A step job's items: it runs as begin_step and, later, finish_step, so that the next step can begin
  // while this one is on the device.
  std::shared_ptr<const std::vector<pearl::StepItem>> step_items;
  ResultBuilder build;
  std::string error;
  bool failed = false;
  // Set by close(), and by load() when it fails: the engine thread exits after this job.
  bool ends_thread = false;
  bool ends_thread_on_failure = false;
};

void SettleJob(Napi::Env env, Napi::Function, void*, Job* job);
pearl::Engine& Loaded(std::unique_ptr<pearl::Engine>& engine);
Napi::Array ToJs(Napi::Env env, std::vector<pearl::StepResult>& results);
using CompletionQueue = Napi::TypedThreadSafeFunction<void, Job, SettleJob>;

// The engine thread and its queue. Shared between the NativeEngine and the TSFN finalizer.
class EngineThread {
 public:
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }

  void Push(std::unique_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(job));
    }
    wake_.notify_one();
  }

  // Main thread. Lets the running job finish, waits for the thread to exit and hands back the jobs that
  // never ran.
  std::deque<std::unique_ptr<Job>> StopAndJoin() {
    std::deque<std::unique_ptr<Job>> never_ran;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      never_ran.swap(queue_);
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
    return never_ran;
  }

  // Main-thread state of the completion queue.
  CompletionQueue completions;
  bool completions_released = false;
  bool completions_finalized = false;

 private:
  // Jobs run in submission order. A step job is begun (Engine::begin_step) and finished later, so that the
  // step queued behind it can begin while it is still on the device when the engine allows that
  // (can_begin_behind); meanwhile the thread polls the queue and the step. Any other job waits until no step
  // is in flight.
  void Run() {
#ifdef __linux__
    pthread_setname_np(pthread_self(), "pearl-engine");
#endif
    std::deque<std::unique_ptr<Job>> begun;
    for (;;) {
      std::unique_ptr<Job> job;
      bool job_waiting = false;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (begun.empty()) wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_) break;
        if (!queue_.empty() && (begun.empty() || CanBeginBehind(*queue_.front()))) {
          job = std::move(queue_.front());
          queue_.pop_front();
        }
        job_waiting = !queue_.empty();
      }
      if (job && job->step_items) {
        if (Attempt(*job, [&] { Loaded(engine_).begin_step(*job->step_items); })) {
          begun.push_back(std::move(job));
        } else {
          Complete(std::move(job));
        }
      } else if (job) {
        Attempt(*job, [&] { job->build = job->work(engine_); });
        const bool ends_thread = job->ends_thread;
        Complete(std::move(job));
        if (ends_thread) break;
      } else if (job_waiting || engine_->step_finished()) {
        FinishOldest(begun);
      } else {
        std::this_thread::yield();
      }
    }
    while (!begun.empty()) FinishOldest(begun);
    // The engine is created and destroyed on this thread (a CUDA context is bound to it).
    engine_.reset();
  }

  bool CanBeginBehind(const Job& job) const {
    return job.step_items && engine_ && engine_->can_begin_behind(*job.step_items);
  }

  // Runs `body`; a thrown error fails the job. Returns whether it succeeded.
  template <typename Body>
  static bool Attempt(Job& job, Body body) {
    try {
      body();
      return true;
    } catch (const std::exception& error) {
      job.error = error.what();
    } catch (...) {
      job.error = "unknown native error";
    }
    job.failed = true;
    if (job.ends_thread_on_failure) job.ends_thread = true;
    return false;
  }

  // Settles the oldest begun step. When it fails, so has every step begun behind it (Engine::finish_step).
  void FinishOldest(std::deque<std::unique_ptr<Job>>& begun) {
    std::unique_ptr<Job> job = std::move(begun.front());
    begun.pop_front();
    std::shared_ptr<std::vector<pearl::StepResult>> results;
    const bool finished = Attempt(*job, [&] {
      results = std::make_shared<std::vector<pearl::StepResult>>(Loaded(engine_).finish_step());
    });
    const std::string error = job->error;
    if (finished) job->build = [results](Napi::Env env) -> Napi::Value { return ToJs(env, *results); };
    Complete(std::move(job));
    if (finished) return;
    for (auto& behind : begun) {
      behind->failed = true;
      behind->error = "the step before it failed: " + error;
      Complete(std::move(behind));
    }
    begun.clear();
  }

  // Hands the job to the main thread, which settles its Promise.
  void Complete(std::unique_ptr<Job> job) {
    // napi_closing means the environment is going away: nobody is left to settle the Promise.
    if (completions.NonBlockingCall(job.get()) == napi_ok) job.release();
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Job>> queue_;
  bool stopping_ = false;
  std::thread thread_;
  std::unique_ptr<pearl::Engine> engine_;
};

// ---- argument conversion (main thread); TypeErrors name the offending field ----

[[noreturn]] void ThrowType(Napi::Env env, const std::string& message) {
  throw Napi::TypeError::New(env, message);
}

double ToNumber(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!value.IsNumber()) ThrowType(env, field + " must be a number");
  return value.As<Napi::Number>().DoubleValue();
}

int ToInt(Napi::Env env, const Napi::Value& value, const std::string& field) {
  const double number = ToNumber(env, value, field);
  if (!(std::trunc(number) == number && number >= INT32_MIN && number <= INT32_MAX)) {
    ThrowType(env, field + " must be a 32-bit integer, got " + value.ToString().Utf8Value());
  }
  return static_cast<int>(number);
}

uint64_t ToSafeUint(Napi::Env env, const Napi::Value& value, const std::string& field) {
  const double number = ToNumber(env, value, field);
  if (!(std::trunc(number) == number && number >= 0 && number <= kMaxSafeInteger)) {
    ThrowType(env, field + " must be an integer in [0, 2^53 - 1], got " + value.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(number);
}

bool ToBool(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!value.IsBoolean()) ThrowType(env, field + " must be a boolean");
  return value.As<Napi::Boolean>().Value();
}

std::string ToString(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!value.IsString()) ThrowType(env, field + " must be a string");
  return value.As<Napi::String>().Utf8Value();
}

Napi::Object ToObject(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!value.IsObject() || value.IsArray()) ThrowType(env, field + " must be an object");
  return value.As<Napi::Object>();
}

Napi::Array ToArray(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!value.IsArray()) ThrowType(env, field + " must be an array");
  return value.As<Napi::Array>();
}

bool IsTypedArrayOf(const Napi::Value& value, napi_typedarray_type type) {
  return value.IsTypedArray() && value.As<Napi::TypedArray>().TypedArrayType() == type;
}

std::vector<int32_t> ToInt32Vector(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!IsTypedArrayOf(value, napi_int32_array)) ThrowType(env, field + " must be an Int32Array");
  const auto array = value.As<Napi::Int32Array>();
  return std::vector<int32_t>(array.Data(), array.Data() + array.ElementLength());
}

std::vector<float> ToFloat32Vector(Napi::Env env, const Napi::Value& value, const std::string& field) {
  if (!IsTypedArrayOf(value, napi_float32_array)) ThrowType(env, field + " must be a Float32Array");
  const auto array = value.As<Napi::Float32Array>();
  return std::vector<float>(array.Data(), array.Data() + array.ElementLength());
}

// Optional fields: absent and undefined both mean "use the default".
bool Has(const Napi::Object& object, const char* key) {
  return object.Has(key) && !object.Get(key).IsUndefined();
}

pearl::EngineOptions ToEngineOptions(Napi::Env env, const Napi::Value& value) {
  const Napi::Object object = ToObject(env, value, "options");
  pearl::EngineOptions options;
  options.model_dir = ToString(env, object.Get("modelDir"), "options.modelDir");
  if (Has(object, "backend")) options.backend = ToString(env, object.Get("backend"), "options.backend");
  if (Has(object, "blockSize")) options.block_size = ToInt(env, object.Get("blockSize"), "options.blockSize");
  if (Has(object, "numBlocks")) options.num_blocks = ToInt(env, object.Get("numBlocks"), "options.numBlocks");
  if (Has(object, "numThreads")) {
    options.num_threads = ToInt(env, object.Get("numThreads"), "options.numThreads");
  }
  if (Has(object, "deterministic")) {
    options.deterministic = ToBool(env, object.Get("deterministic"), "options.deterministic");
  }
  if (Has(object, "devices")) {
    const Napi::Array devices = ToArray(env, object.Get("devices"), "options.devices");
    for (uint32_t i = 0; i < devices.Length(); ++i) {
      options.devices.push_back(ToInt(env, devices.Get(i), "options.devices[" + std::to_string(i) + "]"));
    }
  }
  return options;
}

pearl::SamplingParams ToSamplingParams(Napi::Env env, const Napi::Value& value, const std::string& field) {
  const Napi::Object object = ToObject(env, value, field);
  pearl::SamplingParams sampling;
  sampling.temperature = static_cast<float>(ToNumber(env, object.Get("temperature"), field + ".temperature"));
  sampling.top_k = ToInt(env, object.Get("topK"), field + ".topK");
  sampling.top_p = static_cast<float>(ToNumber(env, object.Get("topP"), field + ".topP"));
  sampling.seed = ToSafeUint(env, object.Get("seed"), field + ".seed");
  return sampling;
}

pearl::StepOutput ToStepOutput(Napi::Env env, const Napi::Value& value, const std::string& field) {
  const std::string name = ToString(env, value, field);
  if (name == "none") return pearl::StepOutput::None;
  if (name == "sample") return pearl::StepOutput::Sample;
  if (name == "logits") return pearl::StepOutput::Logits;
  ThrowType(env, field + " must be \"none\", \"sample\" or \"logits\", got \"" + name + "\"");
}

pearl::StepItem ToStepItem(Napi::Env env, const Napi::Value& value, const std::string& field) {
  const Napi::Object object = ToObject(env, value, field);
  pearl::StepItem item;
  item.seq_id = ToSafeUint(env, object.Get("seqId"), field + ".seqId");
  item.tokens = ToInt32Vector(env, object.Get("tokens"), field + ".tokens");
  if (Has(object, "numDraft")) item.num_draft = ToInt(env, object.Get("numDraft"), field + ".numDraft");
  if (Has(object, "draftDists")) {
    const Napi::Array dists = ToArray(env, object.Get("draftDists"), field + ".draftDists");
    for (uint32_t i = 0; i < dists.Length(); ++i) {
      const std::string dist_field = field + ".draftDists[" + std::to_string(i) + "]";
      const Napi::Object dist = ToObject(env, dists.Get(i), dist_field);
      item.draft_dists.push_back({ToInt32Vector(env, dist.Get("tokens"), dist_field + ".tokens"),
                                  ToFloat32Vector(env, dist.Get("probs"), dist_field + ".probs")});
    }
  }
  if (Has(object, "output")) item.output = ToStepOutput(env, object.Get("output"), field + ".output");
  if (Has(object, "sampling")) item.sampling = ToSamplingParams(env, object.Get("sampling"), field + ".sampling");
  if (Has(object, "commit")) item.commit = ToBool(env, object.Get("commit"), field + ".commit");
  if (Has(object, "returnTopK")) item.return_top_k = ToInt(env, object.Get("returnTopK"), field + ".returnTopK");
  if (Has(object, "feedNextToken")) {
    item.feed_next_token = ToBool(env, object.Get("feedNextToken"), field + ".feedNextToken");
  }
  if (Has(object, "logprobs")) item.logprobs = ToInt(env, object.Get("logprobs"), field + ".logprobs");
  if (Has(object, "promptLogprobs")) {
    item.prompt_logprobs = ToInt(env, object.Get("promptLogprobs"), field + ".promptLogprobs");
  }
  if (Has(object, "nextPromptToken")) {
    item.next_prompt_token = ToInt(env, object.Get("nextPromptToken"), field + ".nextPromptToken");
  }
  return item;
}

// ---- results (main thread) ----

Napi::Int32Array CopyToInt32Array(Napi::Env env, const std::vector<int32_t>& values) {
  auto array = Napi::Int32Array::New(env, values.size());
  std::copy(values.begin(), values.end(), array.Data());
  return array;
}

Napi::Float32Array CopyToFloat32Array(Napi::Env env, const std::vector<float>& values) {
  auto array = Napi::Float32Array::New(env, values.size());
  std::copy(values.begin(), values.end(), array.Data());
  return array;
}

// Logits can be large ([tokens x vocab]): hand the vector's storage to JS instead of copying it, and
// tell V8 how much memory it keeps alive so GC pressure stays honest.
Napi::Float32Array AdoptAsFloat32Array(Napi::Env env, std::vector<float>&& values) {
  if (values.empty()) return Napi::Float32Array::New(env, 0);
  auto* owned = new std::vector<float>(std::move(values));
  const size_t bytes = owned->size() * sizeof(float);
  auto buffer = Napi::ArrayBuffer::New(env, owned->data(), bytes, [bytes](Napi::Env finalize_env, void*,
                                                                           std::vector<float>* storage) {
    Napi::MemoryManagement::AdjustExternalMemory(finalize_env, -static_cast<int64_t>(bytes));
    delete storage;
  }, owned);
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(bytes));
  return Napi::Float32Array::New(env, owned->size(), buffer, 0);
}

Napi::Object ToJs(Napi::Env env, const pearl::ModelInfo& info) {
  auto object = Napi::Object::New(env);
  object.Set("architecture", info.architecture);
  object.Set("modelType", info.model_type);
  object.Set("vocabSize", info.vocab_size);
  object.Set("hiddenSize", info.hidden_size);
  object.Set("numLayers", info.num_layers);
  object.Set("numHeads", info.num_heads);
  object.Set("numKvHeads", info.num_kv_heads);
  object.Set("headDim", info.head_dim);
  object.Set("maxPositionEmbeddings", info.max_position_embeddings);
  auto eos = Napi::Array::New(env, info.eos_token_ids.size());
  for (size_t i = 0; i < info.eos_token_ids.size(); ++i) eos.Set(static_cast<uint32_t>(i), info.eos_token_ids[i]);
  object.Set("eosTokenIds", eos);
  object.Set("bosTokenId", info.bos_token_id);
  object.Set("dtype", info.dtype);
  object.Set("backend", info.backend);
  object.Set("numParameters", static_cast<double>(info.num_parameters));
  return object;
}

Napi::Object ToJs(Napi::Env env, const pearl::CacheStats& stats) {
  auto object = Napi::Object::New(env);
  object.Set("blockSize", stats.block_size);
  object.Set("blocksTotal", stats.blocks_total);
  object.Set("blocksUsed", stats.blocks_used);
  object.Set("blocksFree", stats.blocks_free);
  object.Set("blocksCached", stats.blocks_cached);
  object.Set("prefixHitTokens", static_cast<double>(stats.prefix_hit_tokens));
  object.Set("prefixQueries", static_cast<double>(stats.prefix_queries));
  object.Set("prefixHits", static_cast<double>(stats.prefix_hits));
  object.Set("sequences", stats.sequences);
  return object;
}

Napi::Object ToJs(Napi::Env env, const pearl::Logprobs& logprobs) {
  auto object = Napi::Object::New(env);
  object.Set("topK", logprobs.top_k);
  object.Set("tokens", CopyToInt32Array(env, logprobs.tokens));
  object.Set("logprobs", CopyToFloat32Array(env, logprobs.logprobs));
  object.Set("topTokens", CopyToInt32Array(env, logprobs.top_tokens));
  object.Set("topLogprobs", CopyToFloat32Array(env, logprobs.top_logprobs));
  return object;
}

Napi::Array ToJs(Napi::Env env, std::vector<pearl::StepResult>& results) {
  auto array = Napi::Array::New(env, results.size());
  for (size_t i = 0; i < results.size(); ++i) {
    pearl::StepResult& result = results[i];
    auto object = Napi::Object::New(env);
    object.Set("seqId", static_cast<double>(result.seq_id));
    object.Set("accepted", result.accepted);
    object.Set("nextToken", result.next_token);
    object.Set("length", static_cast<double>(result.length));
    if (!result.logits.empty()) object.Set("logits", AdoptAsFloat32Array(env, std::move(result.logits)));
    if (!result.q.tokens.empty()) {
      auto q = Napi::Object::New(env);
      q.Set("tokens", CopyToInt32Array(env, result.q.tokens));
      q.Set("probs", CopyToFloat32Array(env, result.q.probs));
      object.Set("q", q);
    }
    if (!result.logprobs.tokens.empty()) object.Set("logprobs", ToJs(env, result.logprobs));
    if (!result.prompt_logprobs.tokens.empty()) object.Set("promptLogprobs", ToJs(env, result.prompt_logprobs));
    array.Set(static_cast<uint32_t>(i), object);
  }
  return array;
}

pearl::Engine& Loaded(std::unique_ptr<pearl::Engine>& engine) {
  if (!engine) throw std::runtime_error("the engine is not loaded");
  return *engine;
}

// ---- the JS class ----

class NativeEngine : public Napi::ObjectWrap<NativeEngine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEngine",
                       {
                           InstanceMethod<&NativeEngine::Load>("load"),
                           InstanceMethod<&NativeEngine::AddSequence>("addSequence"),
                           InstanceMethod<&NativeEngine::Truncate>("truncate"),
                           InstanceMethod<&NativeEngine::Release>("release"),
                           InstanceMethod<&NativeEngine::SequenceLength>("sequenceLength"),
                           InstanceMethod<&NativeEngine::Step>("step"),
                           InstanceMethod<&NativeEngine::CacheStatsMethod>("cacheStats"),
                           InstanceMethod<&NativeEngine::Close>("close"),
                       });
  }

  explicit NativeEngine(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<NativeEngine>(info), thread_(std::make_shared<EngineThread>()) {
    // The finalizer holds its own share of the thread state: at teardown it may run after this object
    // is gone, or before it.
    auto* finalizer_share = new std::shared_ptr<EngineThread>(thread_);
    thread_->completions = CompletionQueue::New(
        info.Env(), "pearl-engine", 0, 1, nullptr,
        [](Napi::Env, std::shared_ptr<EngineThread>* share, void*) {
          (*share)->StopAndJoin();
          (*share)->completions_finalized = true;
          delete share;
        },
        finalizer_share);
    thread_->completions.Unref(info.Env());
    thread_->Start();
  }

  ~NativeEngine() override {
    if (thread_->completions_released || thread_->completions_finalized) return;
    thread_->StopAndJoin();
    thread_->completions.Release();
    thread_->completions_released = true;
  }

  void Settle(Napi::Env env, std::unique_ptr<Job> job) {
    if (job->ends_thread) {
      closed_ = true;
      // Only a failed load leaves jobs behind (close() stops new submissions at once).
      for (const auto& never_ran : thread_->StopAndJoin()) {
        never_ran->deferred.Reject(Napi::Error::New(env, "the engine failed to load: " + job->error).Value());
        --pending_;
      }
      thread_->completions.Release();
      thread_->completions_released = true;
    }
    if (job->failed) {
      job->deferred.Reject(Napi::Error::New(env, job->error).Value());
    } else {
      try {
        job->deferred.Resolve(job->build(env));
      } catch (const Napi::Error& error) {
        job->deferred.Reject(error.Value());
      }
    }
    if (--pending_ == 0) {
      if (!thread_->completions_released) thread_->completions.Unref(env);
      Unref();
    }
  }

 private:
  Napi::Value Submit(Napi::Env env, std::unique_ptr<Job> job) {
    const Napi::Promise promise = job->deferred.Promise();
    if (closed_) {
      job->deferred.Reject(Napi::Error::New(env, "the engine is closed").Value());
      return promise;
    }
    if (pending_++ == 0) {
      Ref();
      thread_->completions.Ref(env);
    }
    if (job->ends_thread) closed_ = true;
    thread_->Push(std::move(job));
    return promise;
  }

  std::unique_ptr<Job> MakeJob(Napi::Env env, Work work) { return std::make_unique<Job>(this, env, std::move(work)); }

  Napi::Value Load(const Napi::CallbackInfo& info) {
    const Napi::Env env = info.Env();
    if (load_called_) throw Napi::Error::New(env, "load() may be called only once per NativeEngine");
    auto options = std::make_shared<pearl::EngineOptions>(ToEngineOptions(env, info[0]));
    load_called_ = true;
    auto job = MakeJob(env, [options](std::unique_ptr<pearl::Engine>& engine) -> ResultBuilder {
      engine = pearl::Engine::create(*options);
      auto model_info = std::make_shared<pearl::ModelInfo>(engine->info());
      return [model_info](Napi::Env result_env) -> Napi::Value { return ToJs(result_env, *model_info); };
    });
    job->ends_thread_on_failure = true;
    return Submit(env, std::move(job));
  }

  Napi::Value AddSequence(const Napi::CallbackInfo& info) {
    const uint64_t seq_id = ToSafeUint(info.Env(), info[0], "seqId");
    return Submit(info.Env(), MakeJob(info.Env(), [seq_id](std::unique_ptr<pearl::Engine>& engine) {
                    Loaded(engine).add_sequence(seq_id);
                    return Undefined();
                  }));
  }

  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    const uint64_t seq_id = ToSafeUint(info.Env(), info[0], "seqId");
    const int64_t length = static_cast<int64_t>(ToSafeUint(info.Env(), info[1], "length"));
    return Submit(info.Env(), MakeJob(info.Env(), [seq_id, length](std::unique_ptr<pearl::Engine>& engine) {
                    Loaded(engine).truncate(seq_id, length);
                    return Undefined();
                  }));
  }

  Napi::Value Release(const Napi::CallbackInfo& info) {
    const uint64_t seq_id = ToSafeUint(info.Env(), info[0], "seqId");
    return Submit(info.Env(), MakeJob(info.Env(), [seq_id](std::unique_ptr<pearl::Engine>& engine) {
                    Loaded(engine).release(seq_id);
                    return Undefined();
                  }));
  }

  Napi::Value SequenceLength(const Napi::CallbackInfo& info) {
    const uint64_t seq_id = ToSafeUint(info.Env(), info[0], "seqId");
    return Submit(info.Env(), MakeJob(info.Env(), [seq_id](std::unique_ptr<pearl::Engine>& engine) {
                    const int64_t length = Loaded(engine).sequence_length(seq_id);
                    return ResultBuilder([length](Napi::Env env) -> Napi::Value {
                      return Napi::Number::New(env, static_cast<double>(length));
                    });
                  }));
  }

  Napi::Value Step(const Napi::CallbackInfo& info) {
    const Napi::Env env = info.Env();
    const Napi::Array array = ToArray(env, info[0], "items");
    auto items = std::make_shared<std::vector<pearl::StepItem>>();
    items->reserve(array.Length());
    for (uint32_t i = 0; i < array.Length(); ++i) {
      items->push_back(ToStepItem(env, array.Get(i), "items[" + std::to_string(i) + "]"));
    }
    // The engine thread runs it as begin_step and finish_step (EngineThread::Run), not as work.
    auto job = MakeJob(env, Work{});
    job->step_items = std::move(items);
    return Submit(env, std::move(job));
  }

  Napi::Value CacheStatsMethod(const Napi::CallbackInfo& info) {
    return Submit(info.Env(), MakeJob(info.Env(), [](std::unique_ptr<pearl::Engine>& engine) -> ResultBuilder {
                    const pearl::CacheStats stats = Loaded(engine).cache_stats();
                    return [stats](Napi::Env env) -> Napi::Value { return ToJs(env, stats); };
                  }));
  }

  // Runs after every call queued before it; later calls reject at once.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    auto job = MakeJob(info.Env(), [](std::unique_ptr<pearl::Engine>& engine) {
      engine.reset();
      return Undefined();
    });
    job->ends_thread = true;
    return Submit(info.Env(), std::move(job));
  }

  static ResultBuilder Undefined() {
    return [](Napi::Env env) -> Napi::Value { return env.Undefined(); };
  }

  std::shared_ptr<EngineThread> thread_;
  int pending_ = 0;
  bool closed_ = false;
  bool load_called_ = false;
};

void SettleJob(Napi::Env env, Napi::Function, void*, Job* job) {
  std::unique_ptr<Job> owned(job);
  // A null env means the TSFN is being torn down with the environment: just free the job.
  if (env == nullptr) return;
  owned->owner->Settle(env, std::move(owned));
}

// CUDA devices this process sees (after CUDA_VISIBLE_DEVICES), so that `pearl serve` can place the models
// before it starts them; 0 in a build without CUDA, where backend "auto" means cpu.
Napi::Value CudaDeviceCount(const Napi::CallbackInfo& info) {
#ifdef PEARL_WITH_CUDA
  return Napi::Number::New(info.Env(), pearl::cuda_device_count());
#else
  return Napi::Number::New(info.Env(), 0);
#endif
}

// measureAllReduce(devices, floats, deterministic): median microseconds of one all-reduce over a
// tensor-parallel group, for bench/gpu.ts's floor. Synchronous: a benchmark's probe, not a serving call.
Napi::Value MeasureAllReduce(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    const Napi::Array list = ToArray(env, info[0], "devices");
    std::vector<int> devices;
    for (uint32_t i = 0; i < list.Length(); ++i) {
      devices.push_back(ToInt(env, list.Get(i), "devices[" + std::to_string(i) + "]"));
    }
    const int floats = ToInt(env, info[1], "floats");
    if (devices.empty() || floats <= 0) throw std::invalid_argument("measureAllReduce: devices and floats > 0 needed");
#ifdef PEARL_WITH_CUDA
    return Napi::Number::New(
        env, pearl::all_reduce_microseconds(devices, static_cast<size_t>(floats), ToBool(env, info[2], "deterministic")));
#else
    throw std::runtime_error("measureAllReduce needs a build of pearl with CUDA");
#endif
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& error) {
    throw Napi::Error::New(env, error.what());
  }
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeEngine", NativeEngine::Define(env));
  exports.Set("cudaDeviceCount", Napi::Function::New(env, CudaDeviceCount, "cudaDeviceCount"));
  exports.Set("measureAllReduce", Napi::Function::New(env, MeasureAllReduce, "measureAllReduce"));
  return exports;
}

}  // namespace

NODE_API_MODULE(pearl_addon, Init)
