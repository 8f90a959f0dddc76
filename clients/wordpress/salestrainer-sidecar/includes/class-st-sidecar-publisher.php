<?php
/**
 * Publishing a job: the v1 body of docs/contract.md, its signature, and SendMessage to SQS.
 *
 * The signature is an HMAC over the exact bytes sent, whatever the JSON flags: the body is encoded
 * once (wp_json_encode, so `/` goes out as `\/`) and that string is both signed and sent. SQS is
 * reached with AsyncAws' SQS client (composer `async-aws/sqs`, or Debian's php-async-aws-sqs).
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

/**
 * Builds, signs and sends job messages.
 */
final class ST_Sidecar_Publisher {

	// Limits of the contract, checked here too so the caller hears of a mistake at once instead of
	// from a failed callback later (docs/contract.md, "Job message, v1").
	const JOB_ID_PATTERN     = '/^[A-Za-z0-9._:-]{1,128}$/';
	const MAX_BODY_BYTES     = 262144;
	const MAX_METADATA_BYTES = 16384;
	const MAX_PROMPT_CHARS   = 4000;

	/**
	 * Signing secrets, the first one first.
	 *
	 * @var string[]
	 */
	private $secrets;

	/**
	 * The SQS client.
	 *
	 * @var \AsyncAws\Sqs\SqsClient
	 */
	private $sqs;

	/**
	 * The queue.
	 *
	 * @var string
	 */
	private $queue_url;

	/**
	 * A publisher with its secrets, client and queue given (tests, or a site that builds its own client).
	 *
	 * @param string[]                $secrets   Signing secrets.
	 * @param \AsyncAws\Sqs\SqsClient $sqs       SQS client.
	 * @param string                  $queue_url Queue URL.
	 */
	public function __construct( array $secrets, $sqs, $queue_url ) {
		$this->secrets   = $secrets;
		$this->sqs       = $sqs;
		$this->queue_url = $queue_url;
	}

	/**
	 * A publisher configured from wp-config, or one whose enqueue() reports what is missing.
	 *
	 * @return ST_Sidecar_Publisher|ST_Sidecar_Unconfigured_Publisher
	 */
	public static function from_config() {
		$missing = ST_Sidecar_Config::missing_for_publishing();
		if ( $missing ) {
			return new ST_Sidecar_Unconfigured_Publisher( 'define ' . implode( ', ', $missing ) . ' in wp-config.php' );
		}
		if ( ! self::load_sqs_client() ) {
			return new ST_Sidecar_Unconfigured_Publisher( 'the AsyncAws SQS client is not installed (composer require async-aws/sqs in the plugin, or apt-get install php-async-aws-sqs)' );
		}
		$options = array( 'region' => ST_Sidecar_Config::get( 'region' ) );
		$map     = array(
			'endpoint'          => 'endpoint',
			'access_key_id'     => 'accessKeyId',
			'secret_access_key' => 'accessKeySecret',
			'session_token'     => 'sessionToken',
		);
		foreach ( $map as $setting => $option ) {
			$value = ST_Sidecar_Config::get( $setting );
			if ( null !== $value ) {
				$options[ $option ] = $value;
			}
		}
		// Without keys, AsyncAws takes the usual chain: environment, ~/.aws, then the instance role.
		$sqs = new \AsyncAws\Sqs\SqsClient( $options );
		return new self( ST_Sidecar_Config::secrets(), $sqs, ST_Sidecar_Config::get( 'queue_url' ) );
	}

	/**
	 * Make AsyncAws' SqsClient loadable: the plugin's own vendor/ (composer), else Debian's copy on
	 * the include path (/usr/share/php).
	 *
	 * @return bool Whether the class can be used.
	 */
	public static function load_sqs_client() {
		if ( class_exists( '\AsyncAws\Sqs\SqsClient' ) ) {
			return true;
		}
		$vendor = dirname( __DIR__ ) . '/vendor/autoload.php';
		if ( is_readable( $vendor ) ) {
			require_once $vendor;
		}
		if ( ! class_exists( '\AsyncAws\Sqs\SqsClient' ) ) {
			$debian = stream_resolve_include_path( 'AsyncAws/Sqs/autoload.php' );
			if ( $debian ) {
				require_once $debian;
			}
		}
		return class_exists( '\AsyncAws\Sqs\SqsClient' );
	}

	/**
	 * Sign and send one job; the job's row is queued first, so its callback always finds it.
	 *
	 * @param string     $s3_key   Key of the recording.
	 * @param string|int $job_id   The job's id.
	 * @param array      $metadata Associative array echoed back.
	 * @param string     $language ISO-639-1 code or a WordPress locale.
	 * @param array      $options  'prompt', 's3_bucket'.
	 * @return string|WP_Error The SQS MessageId.
	 */
	public function enqueue( $s3_key, $job_id, $metadata = array(), $language = null, $options = array() ) {
		$body = self::body( $s3_key, $job_id, $metadata, $language, $options );
		if ( is_wp_error( $body ) ) {
			return $body;
		}
		$job_id = (string) $job_id;
		$begun  = ST_Sidecar_Job_Store::begin( $job_id, $s3_key, $metadata ? $metadata : null );
		if ( is_wp_error( $begun ) ) {
			return $begun;
		}
		try {
			$result     = $this->sqs->sendMessage(
				array(
					'QueueUrl'          => $this->queue_url,
					'MessageBody'       => $body,
					'MessageAttributes' => array(
						'signature' => array(
							'DataType'    => 'String',
							'StringValue' => self::signature( $body, $this->secrets, time() ),
						),
					),
				)
			);
			$message_id = (string) $result->getMessageId();
		} catch ( \Exception $e ) {
			// AsyncAws raises its own exceptions (HTTP, network, credentials); the message says which.
			ST_Sidecar_Job_Store::not_sent( $job_id, $e->getMessage() );
			return new WP_Error( 'salestrainer_sqs_error', 'SQS did not take the job: ' . $e->getMessage() );
		}
		ST_Sidecar_Job_Store::sent( $job_id, $message_id );
		return $message_id;
	}

	/**
	 * The job's body, exactly as it will be signed and sent.
	 *
	 * @param string     $s3_key   Key of the recording.
	 * @param string|int $job_id   The job's id; an integer goes out as its decimal string.
	 * @param array      $metadata Associative array; empty is left out (PHP would encode it as []).
	 * @param string     $language ISO-639-1 or a locale; a hint, left out when it has no two-letter code.
	 * @param array      $options  'prompt', 's3_bucket'.
	 * @return string|WP_Error
	 */
	public static function body( $s3_key, $job_id, $metadata = array(), $language = null, $options = array() ) {
		$job_id = is_int( $job_id ) ? (string) $job_id : $job_id;
		if ( ! is_string( $job_id ) || ! preg_match( self::JOB_ID_PATTERN, $job_id ) ) {
			return new WP_Error( 'salestrainer_invalid_job', 'job_id must be 1-128 characters of A-Z a-z 0-9 . _ : -' );
		}
		if ( ! is_string( $s3_key ) || '' === $s3_key || strlen( $s3_key ) > 1024 ) {
			return new WP_Error( 'salestrainer_invalid_job', 's3_key must be a non-empty string of at most 1024 bytes' );
		}
		$job = array(
			'job_id' => $job_id,
			's3_key' => $s3_key,
		);
		if ( ! empty( $options['s3_bucket'] ) ) {
			$job['s3_bucket'] = (string) $options['s3_bucket'];
		}
		$code = self::language_code( $language );
		if ( null !== $code ) {
			$job['language'] = $code;
		}
		if ( ! empty( $options['prompt'] ) ) {
			if ( mb_strlen( (string) $options['prompt'] ) > self::MAX_PROMPT_CHARS ) {
				return new WP_Error( 'salestrainer_invalid_job', 'prompt is longer than 4000 characters' );
			}
			$job['prompt'] = (string) $options['prompt'];
		}
		if ( ! empty( $metadata ) ) {
			if ( ! is_array( $metadata ) || array_is_list( $metadata ) ) {
				return new WP_Error( 'salestrainer_invalid_job', 'metadata must be an associative array (a JSON object)' );
			}
			// The contract's limit is on the UTF-8 bytes of the compact encoding, not on \u escapes.
			$compact = wp_json_encode( $metadata, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES );
			if ( false === $compact || strlen( $compact ) > self::MAX_METADATA_BYTES ) {
				return new WP_Error( 'salestrainer_invalid_job', 'metadata must encode to at most 16 KiB of JSON' );
			}
			$job['metadata'] = $metadata;
		}
		$body = wp_json_encode( $job );
		if ( false === $body ) {
			return new WP_Error( 'salestrainer_invalid_job', 'the job cannot be encoded as JSON (invalid UTF-8?)' );
		}
		if ( strlen( $body ) > self::MAX_BODY_BYTES ) {
			return new WP_Error( 'salestrainer_invalid_job', 'the job body is larger than 256 KiB' );
		}
		return $body;
	}

	/**
	 * The `signature` attribute: t=<unix seconds>, then one v1= HMAC-SHA256 of "<t>.<body>" per secret.
	 *
	 * @param string   $body    The exact bytes sent.
	 * @param string[] $secrets Signing secrets.
	 * @param int      $t       Unix seconds.
	 * @return string
	 */
	public static function signature( $body, array $secrets, $t ) {
		$parts = array( 't=' . $t );
		foreach ( $secrets as $secret ) {
			$parts[] = 'v1=' . hash_hmac( 'sha256', $t . '.' . $body, $secret );
		}
		return implode( ',', $parts );
	}

	/**
	 * ISO-639-1 code of a language hint: 'en' stays, 'de_DE' and 'pt-BR' give 'de' and 'pt'; null for
	 * anything else (e.g. 'fil', which has no two-letter code: the model then detects the language).
	 *
	 * @param string|null $language Code or locale.
	 * @return string|null
	 */
	public static function language_code( $language ) {
		if ( is_string( $language ) && preg_match( '/^([a-z]{2})(?:[_-][A-Za-z0-9_-]+)?$/', strtolower( $language ), $m ) ) {
			return $m[1];
		}
		return null;
	}
}
