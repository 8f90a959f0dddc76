<?php
/**
 * POST /wp-json/salestrainer/v1/upload-complete: the sidecar's callback (docs/contract.md, "Callback").
 *
 * Answers, and what the sidecar does with them:
 *   200  stored, or a duplicate of what is stored (changes nothing) -> the job is done
 *   400  not a callback of contract v1                               -> dead-lettered (callback_rejected)
 *   403  no server_token, or a wrong one                             -> dead-lettered (callback_rejected)
 *   500  the database failed                                         -> retried later
 *   503  WP_SERVER_TOKEN is not defined on this site                 -> retried later, nothing is lost
 * A duplicate must get a 2xx: the sidecar retries 409, and would end a stored job as failed.
 *
 * The token comes in the body (server_token) or the X-Server-Token header and is compared with
 * hash_equals. WordPress users play no part: an Authorization header, which WAFs in front of
 * /wp-json strip anyway, is ignored, even one core's application passwords would refuse.
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

/**
 * The REST route and its handling.
 */
final class ST_Sidecar_Callback_Route {

	const REST_NAMESPACE = 'salestrainer/v1';
	const PATH           = '/upload-complete';

	/**
	 * Register the route (rest_api_init).
	 */
	public static function register() {
		register_rest_route(
			self::REST_NAMESPACE,
			self::PATH,
			array(
				'methods'             => 'POST',
				'callback'            => array( self::class, 'handle' ),
				'permission_callback' => array( self::class, 'check_token' ),
			)
		);
	}

	/**
	 * Drop authentication errors for this route only (rest_authentication_errors, late): its caller
	 * proves itself with the server token, so a stray or stale Authorization header must not turn a
	 * delivered transcript into a 401.
	 *
	 * @param WP_Error|null|true $result Errors from earlier checks.
	 * @return WP_Error|null|true
	 */
	public static function ignore_authorization( $result ) {
		global $wp;
		$route = isset( $wp->query_vars['rest_route'] ) ? untrailingslashit( (string) $wp->query_vars['rest_route'] ) : '';
		if ( '/' . self::REST_NAMESPACE . self::PATH === $route && is_wp_error( $result ) ) {
			return null;
		}
		return $result;
	}

	/**
	 * Permission: the body's server_token or the X-Server-Token header equals WP_SERVER_TOKEN.
	 *
	 * @param WP_REST_Request $request The callback.
	 * @return true|WP_Error
	 */
	public static function check_token( $request ) {
		$expected = ST_Sidecar_Config::get( 'server_token' );
		if ( null === $expected ) {
			// 503, not 403: the sidecar retries it, so callbacks wait for the constant instead of being lost.
			return new WP_Error( 'salestrainer_not_configured', 'WP_SERVER_TOKEN is not defined on this site', array( 'status' => 503 ) );
		}
		$body       = $request->get_json_params();
		$candidates = array(
			is_array( $body ) && isset( $body['server_token'] ) && is_string( $body['server_token'] ) ? $body['server_token'] : null,
			$request->get_header( 'x_server_token' ),
		);
		foreach ( $candidates as $given ) {
			if ( is_string( $given ) && '' !== $given && hash_equals( $expected, $given ) ) {
				return true;
			}
		}
		return new WP_Error( 'salestrainer_forbidden', 'missing or wrong server token', array( 'status' => 403 ) );
	}

	/**
	 * Store the callback once and fire the action of its status.
	 *
	 * @param WP_REST_Request $request The callback.
	 * @return WP_REST_Response|WP_Error
	 */
	public static function handle( $request ) {
		$payload = $request->get_json_params();
		$invalid = self::validate( $payload );
		if ( null !== $invalid ) {
			return new WP_Error( 'salestrainer_invalid_callback', $invalid, array( 'status' => 400 ) );
		}
		unset( $payload['server_token'] );
		$job_id = (string) $payload['job_id'];
		$common = array(
			's3_key'  => (string) $payload['s3_key'],
			'attempt' => isset( $payload['attempt'] ) ? (int) $payload['attempt'] : null,
		);
		if ( isset( $payload['timings']['total_ms'] ) ) {
			$common['total_ms'] = (int) $payload['timings']['total_ms'];
		}
		if ( isset( $payload['metadata'] ) && is_array( $payload['metadata'] ) ) {
			$common['metadata'] = wp_json_encode( $payload['metadata'] );
		}
		if ( 'completed' === $payload['status'] ) {
			$transcript = $payload['transcript'];
			$outcome    = ST_Sidecar_Job_Store::complete(
				$job_id,
				$common + array(
					'transcript'       => wp_json_encode( $transcript ),
					'model'            => isset( $payload['model'] ) ? (string) $payload['model'] : null,
					'language'         => isset( $transcript['language'] ) ? (string) $transcript['language'] : null,
					'duration_seconds' => isset( $transcript['duration_seconds'] ) ? (string) (float) $transcript['duration_seconds'] : null,
				)
			);
			$action     = 'salestrainer_transcript_ready';
			$detail     = $transcript;
		} else {
			$error   = $payload['error'];
			$outcome = ST_Sidecar_Job_Store::fail(
				$job_id,
				$common + array(
					'error_code'    => (string) $error['code'],
					'error_message' => isset( $error['message'] ) ? (string) $error['message'] : '',
				)
			);
			$action  = 'salestrainer_transcript_failed';
			$detail  = $error;
		}
		if ( is_wp_error( $outcome ) ) {
			return $outcome;
		}
		if ( ST_Sidecar_Job_Store::STORED === $outcome ) {
			if ( ! isset( $payload['metadata'] ) ) {
				// A callback without metadata (an older sidecar's failure for a job it could not read):
				// listeners still get what was enqueued, e.g. the post_id that finds their record.
				$job                 = ST_Sidecar_Job_Store::get( $job_id );
				$payload['metadata'] = $job ? $job['metadata'] : null;
			}
			self::fire( $action, $job_id, $detail, $payload );
		}
		return new WP_REST_Response(
			array(
				'ok'        => true,
				'job_id'    => $job_id,
				'duplicate' => ST_Sidecar_Job_Store::DUPLICATE === $outcome,
			),
			200
		);
	}

	/**
	 * Fire an action once the row is stored. A listener that throws is logged, not answered with a
	 * 5xx: the transcript is already stored, and a retried callback would be a duplicate that fires
	 * nothing, so the error would only be hidden.
	 *
	 * @param string $action  Hook name.
	 * @param string $job_id  The job's id.
	 * @param array  $detail  The transcript, or the error.
	 * @param array  $payload The whole callback, without its token.
	 */
	private static function fire( $action, $job_id, $detail, $payload ) {
		try {
			/**
			 * Fires once per job when its transcript is stored (salestrainer_transcript_ready, with the
			 * transcript) or when it failed (salestrainer_transcript_failed, with the error).
			 *
			 * @param string $job_id  The job's id.
			 * @param array  $detail  transcript {text, language, duration_seconds, segments, no_speech}, or error {code, message, retryable}.
			 * @param array  $payload The callback without server_token (metadata, model, attempt, timings ...).
			 */
			do_action( $action, $job_id, $detail, $payload );
		} catch ( \Throwable $e ) {
			// phpcs:ignore WordPress.PHP.DevelopmentFunctions.error_log_error_log -- the only channel a REST callback has.
			error_log( sprintf( 'salestrainer-sidecar: a %s listener failed for job %s: %s', $action, $job_id, $e->getMessage() ) );
		}
	}

	/**
	 * Why the payload is not a callback of contract v1, or null when it is.
	 *
	 * @param mixed $payload Decoded JSON body.
	 * @return string|null
	 */
	private static function validate( $payload ) {
		if ( ! is_array( $payload ) ) {
			return 'the body must be a JSON object (Content-Type: application/json)';
		}
		if ( ! isset( $payload['job_id'] ) || ! is_scalar( $payload['job_id'] ) || ! preg_match( ST_Sidecar_Publisher::JOB_ID_PATTERN, (string) $payload['job_id'] ) ) {
			return 'job_id is missing or not 1-128 characters of A-Z a-z 0-9 . _ : -';
		}
		if ( ! isset( $payload['s3_key'] ) || ! is_string( $payload['s3_key'] ) ) {
			return 's3_key is missing';
		}
		$status = $payload['status'] ?? null;
		if ( 'completed' === $status ) {
			if ( ! isset( $payload['transcript'] ) || ! is_array( $payload['transcript'] ) || ! isset( $payload['transcript']['text'] ) || ! is_string( $payload['transcript']['text'] ) ) {
				return 'a completed callback needs transcript.text';
			}
			return null;
		}
		if ( 'failed' === $status ) {
			if ( ! isset( $payload['error'] ) || ! is_array( $payload['error'] ) || ! isset( $payload['error']['code'] ) || ! is_string( $payload['error']['code'] ) ) {
				return 'a failed callback needs error.code';
			}
			return null;
		}
		return 'status must be completed or failed';
	}
}
