// Types of livemorph's browser SDK (/sdk/livemorph.js); the API of @decartai/sdk@0.0.46.

export declare const VERSION: string;

export declare const ERROR_CODES: {
  readonly INVALID_API_KEY: "INVALID_API_KEY";
  readonly INVALID_BASE_URL: "INVALID_BASE_URL";
  readonly WEB_RTC_ERROR: "WEB_RTC_ERROR";
  readonly MODEL_NOT_FOUND: "MODEL_NOT_FOUND";
  readonly INVALID_INPUT: "INVALID_INPUT";
  readonly INVALID_OPTIONS: "INVALID_OPTIONS";
  readonly TOKEN_CREATE_ERROR: "TOKEN_CREATE_ERROR";
  readonly SERVER_ERROR: "SERVER_ERROR";
  readonly TIMEOUT: "TIMEOUT";
};
export type ErrorCode = (typeof ERROR_CODES)[keyof typeof ERROR_CODES];

/** Error texts after which no client retries (docs/protocol.md, "Error texts"). */
export declare const PERMANENT_ERRORS: readonly string[];
/** `generation_ended` reasons after which the SDK does not reconnect. */
export declare const FINAL_END_REASONS: readonly string[];
/** Largest reference image: 10 MB, checked before anything is sent. */
export declare const MAX_IMAGE_BYTES: number;
/** How long `setPrompt` waits for its ack: 15 s. */
export declare const PROMPT_TIMEOUT_MS: number;
/** How long `setImage` and `set` wait for their ack by default: 30 s. */
export declare const IMAGE_TIMEOUT_MS: number;

/** Every error the SDK throws or emits. */
export declare class LivemorphError extends Error {
  readonly code: ErrorCode;
  readonly data?: Record<string, unknown>;
  /** True when retrying cannot help (bad key, unknown model, not allowed, ...). */
  readonly permanent: boolean;
}
export { LivemorphError as DecartSDKError };

export declare function isPermanentError(text: string): boolean;
export declare function errorFromServerText(text: string): LivemorphError;
export declare function shouldRetry(error: LivemorphError): boolean;

export type RealtimeModelName =
  | "mirage"
  | "mirage_v2"
  | "lucy_v2v_720p_rt"
  | "lucy_2_rt"
  | "live_avatar"
  | "lucy-2.1"
  | "lucy-2.5"
  | "lucy-2.6"
  | "lucy-restyle-2"
  | "lucy-vton-2"
  | "lucy-vton-3"
  | "lucy-vton-3.5"
  | "lucy-vton-3.6"
  | "lucy-latest"
  | "lucy-restyle-latest"
  | "lucy-vton-latest"
  | "lucy-2.1-vton-2";

export interface ModelDefinition {
  readonly name: RealtimeModelName | string;
  readonly urlPath: string;
  readonly fps: number;
  readonly width: number;
  readonly height: number;
  /** For an alias (`lucy-latest`): the model it stands for and is served as. */
  readonly aliasOf?: RealtimeModelName;
}

export declare const models: {
  readonly realtime: {
    (name: RealtimeModelName): ModelDefinition;
    mirage(): ModelDefinition;
    mirageV2(): ModelDefinition;
    lucyV2V720pRt(): ModelDefinition;
    lucy2Rt(): ModelDefinition;
    liveAvatar(): ModelDefinition;
  };
};

export interface RetryPolicy {
  /** Attempts in all, the first included (default 5). */
  attempts?: number;
  /** Wait before the second attempt, in ms, doubling after (default 1000). */
  baseDelay?: number;
  /** Longest wait, in ms (default 10000). */
  maxDelay?: number;
}
export declare const DEFAULT_RETRY: Readonly<Required<RetryPolicy>>;
/** The waits (ms) between attempts: [1000, 2000, 4000, 8000] by default. */
export declare function retryDelays(policy?: RetryPolicy): number[];

export type ImageInput = Blob | File | ArrayBuffer | ArrayBufferView | string;
/** Plain base64 of an image (Blob, File, bytes, data: URL, http(s) URL or base64). */
export declare function imageToBase64(image: ImageInput): Promise<string>;

/**
 * Plain base64 of a live_avatar portrait: a Blob, File or bytes as they are; a string is a URL
 * (http(s), relative to the page, or data:) as in the published SDK, or else plain base64.
 */
export declare function portraitToBase64(image: ImageInput): Promise<string>;

/** An audio clip for `playAudio`: any format the browser decodes (WAV, MP3, Ogg, ...). */
export type AudioInput = Blob | File | ArrayBuffer | ArrayBufferView;

export declare function encodeSubscribeToken(sessionId: string, ip: string, port: number): string;
export declare function decodeSubscribeToken(token: string): {
  sid: string;
  ip: string;
  port: number;
};
/** Add the published SDK's VP8 bitrate hints to an SDP offer. */
export declare function addVp8Bitrate(sdp: string, minKbps?: number, startKbps?: number): string;

export type ConnectionState =
  "connecting" | "connected" | "generating" | "disconnected" | "reconnecting";

export interface Events {
  connectionChange: ConnectionState;
  /** Seconds of generation so far, cumulative for the session. */
  generationTick: { seconds: number };
  /** The server ended the session (`insufficient_credits`, `max_duration`, `server_shutdown`). */
  generationEnded: { seconds: number; reason: string };
  error: LivemorphError;
}

export interface RealTimeClientInitialState {
  prompt?: { text: string; enhance?: boolean } | string;
  image?: ImageInput;
}

/** live_avatar's portrait: a Blob, a File, an image URL or base64 (see portraitToBase64). */
export interface AvatarOptions {
  avatarImage: ImageInput;
}

export interface RealTimeClientConnectOptions {
  model: ModelDefinition | RealtimeModelName;
  /** live_avatar only, and required there (`initialState.image` serves too). */
  avatar?: AvatarOptions;
  onRemoteStream?: (stream: MediaStream) => void;
  initialState?: RealTimeClientInitialState;
  customizeOffer?: (offer: RTCSessionDescriptionInit) => Promise<void> | void;
  /**
   * STUN/TURN servers; none by default: the server is reached directly. Those the server
   * hands over (its `--ice-servers`) are used after these when they arrive before the offer
   * (a session with an initial prompt or image) and on every reconnect.
   */
  iceServers?: RTCIceServer[];
  retry?: RetryPolicy;
  /** How long one attempt may take to get the peer connection up, in ms (default 30000). */
  connectTimeout?: number;
}

export interface SetInput {
  prompt?: string;
  /** Default true. */
  enhance?: boolean;
  /** null clears the image; leaving it out keeps it. */
  image?: ImageInput | null;
}

interface Connection {
  isConnected(): boolean;
  getConnectionState(): ConnectionState;
  on<K extends keyof Events>(event: K, listener: (data: Events[K]) => void): void;
  off<K extends keyof Events>(event: K, listener: (data: Events[K]) => void): void;
  /** Close the peer connection and the WebSocket; stop retrying. */
  disconnect(): void;
}

export interface RealTimeClient extends Connection {
  readonly model: string;
  /** null until the server has named the session. */
  readonly sessionId: string | null;
  /** Pass to `client.realtime.subscribe({token})` on another page to watch this session. */
  readonly subscribeToken: string | null;
  /** How the server's engine read the current prompt (with enhance on), or null. */
  readonly enhancedPrompt: string | null;
  set(input: SetInput): Promise<void>;
  setPrompt(prompt: string, options?: { enhance?: boolean }): Promise<void>;
  setImage(
    image: ImageInput | null,
    options?: { prompt?: string; enhance?: boolean; timeout?: number },
  ): Promise<void>;
  /**
   * live_avatar connected with a null stream only: play a clip into the session (not on the
   * speakers: the voice comes back with the avatar's video). Resolves when the clip has
   * played; a second call stops the one under way, whose promise then resolves.
   */
  playAudio?: (audio: AudioInput) => Promise<void>;
}

export interface Subscription extends Connection {
  readonly sessionId: string;
}

export interface ClientToken {
  apiKey: string;
  expiresAt: string;
  permissions?: { models: string[] };
  constraints?: Record<string, unknown>;
}

export interface TokenOptions {
  expiresIn?: number;
  allowedModels?: string[];
  constraints?: { realtime?: { maxSessionDuration?: number } };
  metadata?: Record<string, unknown>;
}

export interface ServerModel {
  name: string;
  fps: number;
  width: number;
  height: number;
  kind: string;
  available: boolean;
  engine: string | null;
  /** For an alias (`lucy-latest`): the model it stands for and is served as. */
  alias_of: string | null;
  /** The `speed` tiers the published clients advertise; `fast` changes nothing here. */
  speeds: string[];
  /** The `resolution` values `/v1/stream` accepts: `720p`, the model's own size. */
  resolutions: string[];
  /** What this server does not do of what the model is meant to do (try-on, say). */
  limitations: string | null;
}

/** How often `jobs.wait` and `jobs.submitAndWait` poll a job's status: 1000 ms. */
export declare const JOB_POLL_INTERVAL_MS: number;

/** A video to transform: a Blob or File, its bytes, or a URL (fetched). */
export type VideoInput = Blob | File | ArrayBuffer | ArrayBufferView | string;

export type JobState = "pending" | "processing" | "completed" | "failed";

/** A batch job, as `GET /v1/jobs/{jobId}` says it is. */
export interface JobStatus {
  jobId: string;
  status: JobState;
  /** From 0 to 1 while it runs, where the server says it. */
  progress?: number;
  /** Why it failed (status "failed" only). */
  error?: string;
}

export interface JobOptions {
  /** The look; a prompt, a referenceImage, or both. */
  prompt?: string;
  referenceImage?: ImageInput;
  /** Default true. */
  enhancePrompt?: boolean;
}

export interface WaitOptions {
  /** Hears each new status (progress included); awaited when it returns a promise. */
  onProgress?: (status: JobStatus) => void | Promise<void>;
  /** Between two polls, in ms (default 1000). */
  pollInterval?: number;
  /** Stops the waiting (a TIMEOUT error); the job goes on. */
  signal?: AbortSignal;
}

export interface JobsAPI {
  /** Queue a video job; refusals (bad key, unknown model, not a video) reject at once. */
  submit(model: string, video: VideoInput, options: JobOptions): Promise<JobStatus>;
  status(jobId: string): Promise<JobStatus>;
  /** The completed job's MP4 (rejects while it is not completed). */
  result(jobId: string): Promise<Blob>;
  /** Resolves when completed; a failed job rejects with the server's reason. */
  wait(jobId: string, options?: WaitOptions): Promise<JobStatus>;
  /** submit, wait and result in one: the MP4. */
  submitAndWait(
    model: string,
    video: VideoInput,
    options: JobOptions & WaitOptions,
  ): Promise<Blob>;
}

export interface EditImageOptions {
  prompt: string;
  referenceImage?: ImageInput;
  /** Default true. */
  enhancePrompt?: boolean;
}

export interface LivemorphClient {
  readonly baseUrl: string;
  readonly realtime: {
    connect(
      stream: MediaStream | null,
      options: RealTimeClientConnectOptions,
    ): Promise<RealTimeClient>;
    subscribe(options: {
      token: string;
      onRemoteStream?: (stream: MediaStream) => void;
      iceServers?: RTCIceServer[];
      retry?: RetryPolicy;
      connectTimeout?: number;
    }): Promise<Subscription>;
  };
  readonly tokens: { create(options?: TokenOptions): Promise<ClientToken> };
  /** Batch video jobs: a file in, the transformed MP4 out, later. */
  readonly jobs: JobsAPI;
  /** Edit one picture (`lucy-image-2`, ...): the edited picture (PNG, or JPEG for a JPEG). */
  editImage(model: string, image: ImageInput, options: EditImageOptions): Promise<Blob>;
  listModels(): Promise<ServerModel[]>;
}

export interface CreateClientOptions {
  /** A permanent key (on your backend) or a client token (in a browser). */
  apiKey: string;
  /** Default: the origin this module was loaded from. */
  baseUrl?: string;
}

export declare function createClient(options: CreateClientOptions): LivemorphClient;
/** The published SDK's name for `createClient`. */
export declare const createDecartClient: typeof createClient;
